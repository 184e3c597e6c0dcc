"""Every code block of the README, the guides and the other pages of the manual runs, so an example cannot drift
from the code.

- ``python`` blocks run in order, one namespace per page, in a temporary folder that holds tiny random models at
  the paths the pages name. The names a page leaves to the reader (``base``, ``batches``, ...: :data:`GIVEN`) are
  given fresh before each block that uses them: a text classifier, or a causal LM on :data:`CAUSAL_PAGES`.
- ``bash`` blocks: each ``s2ft ...`` command is parsed by the real parser (the subcommand and every option must
  exist and take those values); each ``python benchmarks/NAME.py`` (or ``bash benchmarks/NAME.sh``) must name a
  script; other commands must be known (:data:`KNOWN_COMMANDS`) and are not run. A block marked
  ``<!-- docs-test: run -->`` runs its ``s2ft`` commands too, in a folder holding the tiny models and data files
  the page names.
- ``<!-- docs-test: skip: REASON -->`` on the line before a block skips it (CONTRIBUTING.md, Documentation).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
from collections.abc import Callable
from typing import Any

import pytest
import torch


def _root() -> str:
    """The repository root: the nearest folder above this file that holds pyproject.toml (wherever tests/ puts it)."""
    folder = os.path.dirname(os.path.abspath(__file__))
    while not os.path.isfile(os.path.join(folder, "pyproject.toml")):
        folder = os.path.dirname(folder)
    return folder


ROOT = _root()
PAGES = sorted(
    os.path.relpath(p, ROOT)
    for p in [
        os.path.join(ROOT, "README.md"),
        os.path.join(ROOT, "CONTRIBUTING.md"),
        *glob.glob(os.path.join(ROOT, "docs", "*.md")),
        *glob.glob(os.path.join(ROOT, "docs", "guides", "*.md")),
        *glob.glob(os.path.join(ROOT, "docs", "concepts", "*.md")),
        *glob.glob(os.path.join(ROOT, "docs", "reference", "*.md")),
    ]
)
# Pages whose examples stand on a causal LM (the others on a text classifier).
CAUSAL_PAGES = {"docs/guides/serving.md", "docs/guides/quantized.md", "docs/guides/compile.md"}
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
SKIP = re.compile(r"<!-- docs-test: skip: (?P<reason>.+?) -->")
RUN = "<!-- docs-test: run -->"
# The first words of the shell commands a page may show without the test running them.
KNOWN_COMMANDS = (
    ("pip", "install"),
    ("python", "-m", "pytest"),
    ("python", "-X", "importtime"),
    ("bash", ".ci/run"),
    ("mkdocs",),
    ("ruff",),
)


@dataclasses.dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None
    run: bool = False  # a shell block whose s2ft commands run (on the tiny models), not only parse

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of a page, with the skip marker of the line before each."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        lines = f.read().split("\n")
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, body, j = len(opening["indent"]), [], i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][indent:])
            j += 1
        before = lines[i - 1] if i else ""
        marker = SKIP.search(before)
        reason = marker["reason"] if marker else None
        found.append(Block(page, i + 1, opening["lang"], "\n".join(body), reason, RUN in before))
        i = j + 1
    return found


def test_the_pages_are_found_and_skips_are_rare():
    assert "README.md" in PAGES and "docs/guides/trl.md" in PAGES
    every = [b for page in PAGES for b in blocks(page)]
    assert sum(b.lang == "python" for b in every) >= 7
    skipped = [b for b in every if b.skip]
    assert len(skipped) <= 3, [
        str(b) for b in skipped
    ]  # the marker is for what needs a process group or a GPU


# ---------------------------------------------------------------- tiny models, data and the files pages name
VOCAB = ["<unk>", "<pad>", "<eos>", "What", "is", "+", "?", ".", *map(str, range(100))]
TOPICS = {
    1: ["cold", "late", "broken", "rude", "loud", "dirty"],
    2: ["fine", "plain", "usual", "slow", "small", "okay"],
    3: ["warm", "quick", "kind", "clean", "quiet", "great"],
}
BERT_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    *sorted(w for ws in TOPICS.values() for w in ws),
]
BERT_VOCAB += [str(i) for i in range(100)]


def tiny_bert(num_labels: int = 6) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(BERT_VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def save_tiny_bert(folder: str) -> None:
    """A tiny BERT classifier with its word-level tokenizer, saved as any local model folder."""
    from transformers import BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(BERT_VOCAB) + "\n")
    BertTokenizerFast(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    tiny_bert().save_pretrained(folder)


def write_reviews(path: str, rows: int = 300) -> None:
    """A CSV of short texts (``review``) labelled by their topic (``stars``), as the jobs guide shows."""
    import csv
    import random

    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        for i in range(rows):
            stars = 1 + i % 3
            words = [rng.choice(TOPICS[stars]) for _ in range(rng.randint(4, 9))]
            writer.writerow([" ".join(["the", *words]), stars])


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tokenizer() -> Any:
    """A word-level tokenizer over :data:`VOCAB` (the TRL guide's prompts and completions)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def token_batch(
    rows: int, length: int, labels: Callable[[torch.Tensor], torch.Tensor] | None, seed: int
) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, len(VOCAB), (rows, length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels is not None:
        batch["labels"] = labels(ids)
    return batch


def given(causal: bool) -> dict[str, Callable[[], Any]]:
    """The names pages leave to the reader, each built fresh when a block uses it."""
    load = tiny_llama if causal else tiny_bert
    if causal:
        labelled = lambda i: [token_batch(4, 12, lambda ids: ids.clone(), i) for i in range(i, i + 4)]  # noqa: E731
    else:
        labelled = lambda i: [  # noqa: E731
            token_batch(4, 12, lambda ids: ids[:, 0] % 6, i) for i in range(i, i + 4)
        ]
    return {
        "base": load,
        "fresh_base_model": load,
        "load_base": lambda: load,
        "batches": lambda: labelled(0),
        "calibration_batches": lambda: labelled(0),
        "batch": lambda: token_batch(4, 10, None, 7),
        "prompts": lambda: token_batch(2, 5, None, 8),
        "path": lambda: "models/tiny-llama",
    }


GIVEN = tuple(given(False))


def prepare_folder(page_text: str) -> None:
    """Write, in the current folder, the models and adapters the page names by path."""
    if "path/to/model" in page_text:
        save_tiny_bert("path/to/model")
    if "reviews.csv" in page_text:
        write_reviews("reviews.csv")
    if "HuggingFaceTB/SmolLM2-135M-Instruct" in page_text:
        tiny_llama().save_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        tokenizer().save_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    if "models/tiny-llama" in page_text or re.search(r"\bpath\b", page_text):
        tiny_llama().save_pretrained("models/tiny-llama")
    if "adapters/medical" in page_text:
        from s2ft import FourierFTConfig, get_spectral_model

        model = get_spectral_model(tiny_llama(), FourierFTConfig(target_modules=["q_proj", "v_proj"], seed=3))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("coeffs"):
                    p.normal_(0, 1e-3)
        model.save_pretrained("adapters/medical")


# ---------------------------------------------------------------- python blocks
PYTHON_PAGES = [p for p in PAGES if any(b.lang == "python" and not b.skip for b in blocks(p))]


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    prepare_folder(text)
    # the page's graphs alone: Dynamo counts recompiles per code object, across tests
    if "torch.compile" in text:
        torch._dynamo.reset()
    names = given(page in CAUSAL_PAGES)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.lang != "python" or block.skip:
            continue
        for name, make in names.items():
            if re.search(rf"\b{name}\b", block.code):
                namespace[name] = make()
        try:
            exec(compile(block.code, str(block), "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the code block at {block} failed: {type(e).__name__}: {e}") from e
    return namespace


# ---------------------------------------------------------------- shell blocks
def commands(block: Block) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``&&`` chains split,
    leading ``VAR=value`` assignments removed."""
    text = re.sub(r"\\\n", " ", block.code)
    out = []
    for line in text.split("\n"):
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            command, words = words[:cut], words[cut + 1 :]
            while command and re.match(r"^[A-Z_][A-Z0-9_]*=", command[0]):
                command = command[1:]
            if command:
                out.append(command)
    return out


SHELL = [b for p in PAGES for b in blocks(p) if b.lang in ("bash", "sh", "shell", "console") and not b.skip]


@pytest.mark.parametrize("block", SHELL, ids=str)
def test_shell_commands_exist_and_parse(block, capsys, tmp_path, monkeypatch):
    from s2ft.cli import build_parser, main

    if block.run:
        monkeypatch.chdir(tmp_path)
        with open(os.path.join(ROOT, block.page), encoding="utf-8") as f:
            prepare_folder(f.read())
    for command in commands(block):
        if block.run and command[0] == "s2ft":
            assert main(command[1:]) == 0, (
                f"{block}: `{shlex.join(command)}` failed: {capsys.readouterr().err}"
            )
            continue
        if command[0] == "s2ft" or command[:3] == ["accelerate", "launch", "-m"]:
            argv = command[1:] if command[0] == "s2ft" else command[command.index("s2ft.cli") + 1 :]
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                raise AssertionError(
                    f"{block}: `{shlex.join(command)}` does not parse: {capsys.readouterr().err.strip()}"
                ) from None
        elif command[0] in ("python", "bash") and command[1].startswith("benchmarks/"):
            assert os.path.isfile(os.path.join(ROOT, command[1])), f"{block}: no script {command[1]}"
        else:
            assert any(tuple(command[: len(k)]) == k for k in KNOWN_COMMANDS), (
                f"{block}: `{shlex.join(command)}` is neither an s2ft command nor a known one (KNOWN_COMMANDS)"
            )


# ---------------------------------------------------------------- the generated command-line reference
def test_cli_reference_shows_every_subcommand_and_option():
    """The docs' CLI reference (docs/hooks/cli_reference.py) renders every option of every subcommand of the
    parser the ``s2ft`` command runs."""
    import argparse
    import importlib.util

    from s2ft.cli import build_parser

    spec = importlib.util.spec_from_file_location(
        "cli_reference", os.path.join(ROOT, "docs/hooks/cli_reference.py")
    )
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = hook.on_page_markdown(f"# Command line\n\n{hook.MARKER}\n", None, None, None)
    assert hook.MARKER not in page
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subcommands.choices.items():
        assert f"## `s2ft {name}`" in page
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page, f"s2ft {name} {flag} is missing from the CLI reference"


# ---------------------------------------------------------------- paths the pages name
PATH = re.compile(r"`((?:src|tests|benchmarks|examples|docs)/[\w./-]+\.(?:py|md|yaml|json|toml))`")


@pytest.mark.parametrize("page", [p for p in PAGES if p != "CONTRIBUTING.md"])
def test_the_files_a_page_names_exist(page):
    """A file of the repository named in code (`tests/test_trl.py`, `benchmarks/serving.py`) exists, so a page
    cannot point at a file that moved. (CONTRIBUTING.md describes layouts, not only files that exist.)"""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        named = set(PATH.findall(f.read()))
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{page} names files that do not exist: {missing}"
