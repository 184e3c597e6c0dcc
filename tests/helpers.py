"""What the tests share: tiny models built in the tests (no downloads), batches for them, a tiny local model
folder and dataset file for the jobs, and naive float64 references. Import it as ``tests.helpers`` (pytest puts the
repository root on ``sys.path``; a child process inserts :data:`ROOT` itself). It imports neither s2ft nor
transformers at import time, so a child process that blocks s2ft can still use it."""

from __future__ import annotations

import json
import math
import os
import random

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


class MLP(nn.Module):
    """y = fc2(relu(fc1(x))) with a separate head; non-square layers."""

    def __init__(self, d_in: int = 12, hidden: int = 20, d_out: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.head = nn.Linear(d_out, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def tiny_bert(num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # k_proj and v_proj are 16x32: non-square
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


class ConvNet(nn.Module):
    """Every Conv2d form: a 3x3 stem, a pointwise conv, a grouped 3x3 and a strided depthwise 3x3; a linear head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.depthwise = nn.Conv2d(12, 12, 3, stride=2, groups=12)
        self.head = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.pointwise, self.grouped, self.depthwise):
            x = torch.relu(conv(x))
        return self.head(x.mean(dim=(-2, -1)))


def tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def tiny_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_labels=3,
        layer_type="basic",
    )
    model = ResNetForImageClassification(config).eval()
    for module in model.modules():  # frozen running statistics: a training step changes only trained weights
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.0
    return model


# name -> (factory, target_modules, modules_to_save)
MODELS = {
    "mlp": (tiny_mlp, ["fc1", "fc2"], ["head"]),
    "bert": (tiny_bert, ["query", "value"], ["classifier"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], None),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj"], None),
    "convnet": (tiny_convnet, ["stem", "pointwise", "grouped", "depthwise"], ["head"]),
    "resnet": (tiny_resnet, r".*\.convolution", ["classifier"]),
}


def make_batches(kind: str, count: int = 3, batch_size: int = 4, seed: int = 0) -> list:
    """Batches with labels, so the model computes its own loss (MLP: (x, y) pairs)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        if kind in ("mlp", "convnet"):
            shape = (batch_size, 12) if kind == "mlp" else (batch_size, 3, 9, 9)
            batches.append((torch.randn(shape, generator=g), torch.randint(3, (batch_size,), generator=g)))
        elif kind == "resnet":
            pixels = torch.randn(batch_size, 3, 16, 16, generator=g)
            batches.append({"pixel_values": pixels, "labels": torch.randint(3, (batch_size,), generator=g)})
        else:
            ids = torch.randint(64, (batch_size, 10), generator=g)
            labels = torch.randint(3, (batch_size,), generator=g) if kind == "bert" else ids
            batches.append({"input_ids": ids, "labels": labels})
    return batches


def mlp_loss(outputs: torch.Tensor, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, batch[1])


def forward(model: nn.Module, batch) -> torch.Tensor:
    """The model's main output tensor for a batch."""
    if isinstance(batch, tuple):
        return model(batch[0])
    if "pixel_values" in batch:
        return model(pixel_values=batch["pixel_values"]).logits
    return model(input_ids=batch["input_ids"]).logits


# ----------------------------------------------------------------- a local model folder and dataset for the jobs
WORDS = {
    "sea": ["wave", "ship", "salt", "tide", "harbour", "sail", "anchor", "gull"],
    "land": ["hill", "field", "stone", "road", "farm", "wheat", "fence", "barn"],
    "sky": ["cloud", "star", "moon", "wind", "rain", "storm", "sun", "dawn"],
}


def write_tiny_model(folder, dropout: float = 0.1) -> str:
    """A 2-layer random BERT with a word-level tokenizer, saved like any local model folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "of"]
    vocab += sorted(w for words in WORDS.values() for w in words)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


def write_dataset(path, count: int = 240, labels=tuple(WORDS)) -> str:
    rng = random.Random(0)
    rows = []
    for i in range(count):
        topic = labels[i % len(labels)]
        words = [rng.choice(WORDS[topic]) for _ in range(rng.randint(4, 9))]
        rows.append({"text": " ".join(["the", *words]) + f" {i}", "label": topic})
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def taken(method: str, *flags: str) -> list[str]:
    """``flags`` (``"--n-frequency", "64", ...``, pairs) but those of options ``method`` does not take (which
    finetune refuses)."""
    from s2ft.methods import METHODS

    names = {o.flag for o in METHODS[method].options} if method in METHODS else set()
    pairs = zip(flags[::2], flags[1::2])
    return [item for flag, value in pairs if flag in names for item in (flag, value)]


def finetune(tiny, output, *extra) -> int:
    """``s2ft finetune`` of the tiny model on the tiny dataset (``tiny``: their paths), briefly; its exit status."""
    from s2ft.cli import main

    model, data = tiny
    method = extra[extra.index("--method") + 1] if "--method" in extra else "s2ft"
    argv = ["finetune", "--model", model, "--dataset", data, "--output", str(output), "--quiet"]
    argv += taken(method, "--n-frequency", "64", "--calibration-batches", "4")
    argv += ["--epochs", "2", "--batch-size", "8"]
    argv += ["--head-warmup-steps", "2"]  # the default, 100, is sized for the real task
    return main([*argv, *extra])


# ------------------------------------------------------------------------------------- naive float64 references
def naive_fourier_delta(coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None):
    """ΔW̄[p, q] = α/(MN) Σ_k c_k Re(exp(2πi(u_k p/M + v_k q/N))), then ΔW[π_r[i], π_c[j]] = ΔW̄[i, j], by loops."""
    bar = [[0.0] * d_in for _ in range(d_out)]
    for c, u, v in zip(coeffs.tolist(), rows.tolist(), cols.tolist()):
        for p in range(d_out):
            for q in range(d_in):
                bar[p][q] += (
                    scaling / (d_out * d_in) * c * math.cos(2 * math.pi * (u * p / d_out + v * q / d_in))
                )
    perm_rows = list(range(d_out)) if perm_rows is None else perm_rows.tolist()
    perm_cols = list(range(d_in)) if perm_cols is None else perm_cols.tolist()
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    for i in range(d_out):
        for j in range(d_in):
            delta[perm_rows[i], perm_cols[j]] = bar[i][j]
    return delta


class Stack(nn.Module):
    """``depth`` float64 linear layers of width 32 on ``(batch, seq, 32)`` inputs, one used twice."""

    def __init__(self, depth: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(depth))
        self.head = nn.Linear(32, 5)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        x = x + torch.tanh(self.layers[0](x))  # a second call of the first layer: both calls count
        return self.head(x)


def stack_loss_fn(outputs: torch.Tensor, batch) -> torch.Tensor:
    """The loss of :class:`Stack` on ``(x, labels)`` batches."""
    return nn.functional.cross_entropy(outputs.reshape(-1, 5), batch[1].reshape(-1))


def generate_with_logits(model, ids: torch.Tensor, **kwargs):
    """Greedy ``generate`` of 4 new tokens without autograd: ``(sequences, logits stacked over the new tokens)``."""
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences, torch.stack(out.logits)
