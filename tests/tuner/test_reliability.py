"""The library never loses an adapter or a weight, and never loads or computes a wrong number without a word."""

from __future__ import annotations

import copy
import io
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model
from tests.helpers import MODELS, make_batches, tiny_bert

IDS = torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained(method="s2ft", **options):
    cls = S2FTConfig if method == "s2ft" else FourierFTConfig
    config = cls(target_modules=["query", "value"], modules_to_save=["classifier"], n_frequency=24, **options)
    model = get_spectral_model(tiny_bert(), config)
    if method == "s2ft":
        model.calibrate(make_batches("bert"))
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.coeffs.normal_()
    return model


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "options, message",
    [
        ({"target_modules": "(query"}, "not a valid regular expression"),
        ({"seed": 2**64}, "seed must be an integer from"),
        ({"seed": -(2**63) - 1}, "seed must be an integer from"),
        ({"scaling": True}, "scaling must be a finite non-zero number"),
        ({"gamma": True}, "gamma must be a finite number"),
        ({"calibration_batches": True}, "calibration_batches must be a positive integer"),
    ],
)
def test_bad_config_values_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        S2FTConfig(**{"target_modules": ["query"], **options})


def test_a_failed_wrap_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_bert()
    model.classifier.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())

    def broken(*args, **kwargs):
        raise OverflowError("no locations")

    monkeypatch.setattr(FourierFTConfig, "seeded_locations", broken)
    with pytest.raises(OverflowError):
        get_spectral_model(model, FourierFTConfig(target_modules=["query"], modules_to_save=["classifier"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)


@pytest.mark.parametrize(
    "saves, message",
    [(["attention"], "holds adapted modules"), (["query"], "both target_modules and modules_to_save")],
)
def test_modules_to_save_may_not_overlap_the_targets(saves, message):
    model = tiny_bert()
    with pytest.raises(ValueError, match=message):
        get_spectral_model(model, FourierFTConfig(target_modules=["query"], modules_to_save=saves))
    assert not any("Spectral" in type(m).__name__ for m in model.modules())


# ---------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        trained("fourierft").save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_failed_config_write_keeps_the_old_adapter(tmp_path, monkeypatch):
    old = trained()
    old.save_pretrained(tmp_path)
    expected = logits(SpectralModel.from_pretrained(tiny_bert(), tmp_path))
    new = trained(seed=5)

    import s2ft.tuner.adapter_io as adapter_io

    real = adapter_io.atomic_write_group

    def failing_config(writers):
        def broken(tmp):
            raise OSError("disk full")

        writers = {p: (broken if p.endswith("adapter_config.json") else w) for p, w in writers.items()}
        return real(writers)

    monkeypatch.setattr(adapter_io, "atomic_write_group", failing_config)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(logits(SpectralModel.from_pretrained(tiny_bert(), tmp_path)), expected)


def test_a_failed_second_replacement_puts_the_first_file_back(tmp_path, monkeypatch):
    from s2ft import io as s2ft_io

    trained().save_pretrained(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("adapter_config.json") and not str(src).endswith(".old"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(s2ft_io.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        trained(seed=9).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


def test_saving_after_merge_and_unload_is_refused(tmp_path):
    model = trained()
    model.merge_and_unload()
    with pytest.raises(RuntimeError, match="holds no adapter any more"):
        model.save_pretrained(tmp_path)
    assert not os.listdir(tmp_path)


def tamper(folder, change):
    from s2ft.tuner.adapter_io import FORMAT_KEY, PLAN_KEY, read_adapter

    path = folder / "adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    if FORMAT_KEY in metadata:  # forged in format 1 (integer plan tensors), which loading still checks
        state, _ = read_adapter(str(path))
        metadata = {k: v for k, v in metadata.items() if k not in (FORMAT_KEY, PLAN_KEY)}
    change(state)
    save_file(state, path, metadata=metadata)


def first(state, key):
    return next(k for k in state if k.endswith(key))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s[first(s, ".coeffs")].__setitem__(0, float("nan")), "NaN or infinite"),
        (lambda s: s[first(s, ".coeffs")].__setitem__(1, float("inf")), "NaN or infinite"),
        (
            lambda s: s.__setitem__(first(s, ".coeffs"), s[first(s, ".coeffs")].to(torch.int32)),
            "not floating point",
        ),
        (lambda s: s.__setitem__(first(s, ".rows"), s[first(s, ".rows")].float() + 0.5), "must be integers"),
        (
            lambda s: s.__setitem__(first(s, ".perm_rows"), s[first(s, ".perm_rows")].float()),
            "must be integers",
        ),
        (
            lambda s: (
                s[first(s, ".rows")].__setitem__(1, s[first(s, ".rows")][0]),
                s[first(s, ".cols")].__setitem__(1, s[first(s, ".cols")][0]),
            ),
            "same spectrum location more than once",
        ),
    ],
)
def test_forged_adapter_files_are_refused_on_load(tmp_path, change, message):
    trained().save_pretrained(tmp_path)
    tamper(tmp_path, change)
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        SpectralModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("Spectral" in type(m).__name__ for m in model.modules())


def test_loading_from_a_file_path_or_a_non_utf8_config(tmp_path):
    trained().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pass the adapter folder"):
        SpectralModel.from_pretrained(tiny_bert(), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        SpectralModel.from_pretrained(tiny_bert(), tmp_path)


def test_fourierft_file_is_no_larger_than_peft(tmp_path):
    import peft

    model = trained("fourierft")
    model.save_pretrained(tmp_path / "s2ft")
    config = peft.FourierFTConfig(
        n_frequency=24, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    peft.get_peft_model(tiny_bert(), config).save_pretrained(tmp_path / "peft")
    ours = os.path.getsize(tmp_path / "s2ft" / "adapter_model.safetensors")
    theirs = os.path.getsize(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours <= theirs
    loaded = SpectralModel.from_pretrained(tiny_bert(), tmp_path / "s2ft")
    torch.testing.assert_close(logits(loaded), logits(model))


# ---------------------------------------------------------------------------------------------- lifecycle
def test_calibrating_a_trained_adapter_again_is_refused():
    model = trained()
    plan = [layer.rows.clone() for layer in model.spectral_layers().values()]
    with pytest.raises(RuntimeError, match="already hold trained coefficients"):
        model.calibrate(make_batches("bert", seed=3))
    assert all(torch.equal(a, layer.rows) for a, layer in zip(plan, model.spectral_layers().values()))
    model.calibrate(make_batches("bert", seed=3), force=True)
    assert all(not layer.coeffs.any() for layer in model.spectral_layers().values())
    model.eval()
    with model.disable_adapters():
        base = logits(model)
    torch.testing.assert_close(logits(model), base)


def test_changing_coefficients_while_merged_never_corrupts_the_base_weights():
    model = trained().eval()
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in model.spectral_layers().items()}
    model.merge()
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.coeffs.add_(1.0)
    with pytest.raises(RuntimeError, match="coefficients of a merged adapter were changed"):
        logits(model)
    with pytest.raises(RuntimeError, match="changed while the adapter was merged"):
        model.spectral_layers()[next(iter(weights))].unmerge()
    for layer in list(model.spectral_layers().values())[1:]:
        with pytest.raises(RuntimeError):
            layer.unmerge()
    for name, layer in model.spectral_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)


def test_a_training_step_while_merged_is_refused():
    model = trained()
    model.merge()
    model.train()
    with pytest.raises(RuntimeError, match="unmerge\\(\\) before training"):
        model(input_ids=IDS, labels=torch.zeros(2, dtype=torch.long)).loss.backward()
    model.eval()
    logits(model)  # inference while merged is fine


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_merge_is_exact(dtype):
    model = trained().to(dtype).eval()
    assert all(layer.coeffs.dtype == torch.float32 for layer in model.spectral_layers().values())
    assert all(layer.base_layer.weight.dtype == dtype for layer in model.spectral_layers().values())
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in model.spectral_layers().items()}
    with model.disable_adapters():
        base = logits(model)
    model.merge()
    with model.disable_adapters():
        assert torch.equal(logits(model), base)
    model.unmerge()
    for name, layer in model.spectral_layers().items():
        assert torch.equal(layer.base_layer.weight, weights[name])


def test_a_wrapped_model_pickles():
    model = trained().eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(model)
    torch.testing.assert_close(logits(loaded), logits(model))
    torch.testing.assert_close(logits(copy.deepcopy(model)), logits(model))
    from s2ft.tuner.model import _new_spectral_model  # what models pickled by earlier versions name

    assert type(_new_spectral_model(type(model.get_base_model()))) is type(model)


def test_tuner_modules_import_one_way_and_at_the_top():
    """No import circle among s2ft.tuner's modules, and none hidden in a function-level import."""
    import ast
    import pathlib

    import s2ft.tuner

    folder = pathlib.Path(s2ft.tuner.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {node for node in tree.body if isinstance(node, ast.ImportFrom)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("s2ft.tuner"):
                assert node in top, f"{path.name} imports {node.module} inside a function"
        graph[path.stem] = {
            n.module.rsplit(".", 1)[-1] for n in top if (n.module or "").startswith("s2ft.tuner.")
        }
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name not in done:
            for other in graph.get(name, ()):
                visit(other, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())
    assert {"model", "targets", "saving", "planner"} <= set(graph) and "model" in graph["peft_formats"]


def test_fourierft_layers_have_their_own_location_tensors():
    model = get_spectral_model(tiny_bert(), FourierFTConfig(target_modules=["query", "value"], n_frequency=8))
    layers = list(model.spectral_layers().values())
    assert all(torch.equal(layers[0].rows, other.rows) for other in layers)  # PEFT's draw, per shape
    assert len({layer.rows.data_ptr() for layer in layers}) == len(layers)


def test_trainer_checkpoint_with_safetensors_and_resume(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = get_spectral_model(
        MODELS["bert"][0](), FourierFTConfig(target_modules=["query", "value"], n_frequency=8, init="normal")
    )
    rows = [
        {"input_ids": b["input_ids"][i].tolist(), "labels": int(b["labels"][i])}
        for b in make_batches("bert", 4)
        for i in range(4)
    ]
    data = Dataset.from_list(rows)

    def run(steps, resume=None):
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            max_steps=steps,
            save_strategy="steps",
            save_steps=2,
            learning_rate=0.01,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    run(2)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    saved = os.listdir(checkpoint)
    assert any(f.endswith(".safetensors") for f in saved), saved
    run(4, resume=str(checkpoint))
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
