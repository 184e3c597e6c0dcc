"""Per-adapter cost of a map cache hit with the contents check (as shipped) and without it (the earlier key alone),
against building that adapter's maps: 576x576 layer, n = 1000, fastest of 7 rounds of 2,000 calls.

    OMP_NUM_THREADS=1 python benchmarks/map_cache_check.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

from s2ft import FourierFTConfig, get_spectral_model
from s2ft.ops import mixed
from s2ft.tuner import serving

torch.manual_seed(0)
model = get_spectral_model(
    nn.Sequential(nn.Linear(576, 576)), FourierFTConfig(target_modules=["0"], n_frequency=1000, init="normal")
)
layer = model.spectral_layers()["0"]
adapter = layer.adapters["default"]
cache = serving.MapCache(1 << 30)
maps = mixed._Maps.build([adapter], 576, 576, "cpu").split()[0]


def per_call(f, calls=2000):
    best = 1e9
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


results = {}
for mode in ("check", "no check"):
    serving.MapCache.WATCHED = ("coeffs", "locations") if mode == "check" else ()
    cache.put(adapter, maps)
    assert cache.get(adapter) is maps
    results[mode] = per_call(lambda: cache.get(adapter))
build = per_call(lambda: mixed._Maps.build([adapter], 576, 576, "cpu"), 200)
print(f"hit with check {results['check']:.1f} us, without {results['no check']:.1f} us, build {build:.1f} us")
