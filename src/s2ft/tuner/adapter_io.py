"""The adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors``, read and checked against a model.

The weights file holds each adapted module's coefficients ``{module}.coeffs`` (float32 unless saved in 16 bits)
and the trained ``modules_to_save``; its metadata ``s2ft_shapes`` lists the ``[d_out, d_in]`` of the adapted
modules in the sorted order of their names (files of earlier versions map names to shapes in ``s2ft_layers``).
A file whose adapter stores a plan (S2FT) is of format 2 (metadata ``s2ft_format``): each module's plan is one
``uint8`` tensor ``{module}.plan`` holding, in the order metadata ``s2ft_plan`` names them, the permutations
(``p``: the Lehmer codes of ``perm_rows`` and ``perm_cols``, :func:`s2ft.ops.codec.encode_permutation`) and the
locations (``l``: the Golomb-coded set, :func:`s2ft.ops.codec.encode_locations`), the coefficients then in the
set's canonical order (increasing ``rows * d_in + cols``). A plan derived from the base weights is not stored:
the tensor ``s2ft.fingerprints`` holds 8 bytes of SHA-256 of each module's ``W0`` and 8 of the plans recomputed
from them (:mod:`s2ft.tuner.planner`). Format 3 is format 2 with a digest: each ``{module}.plan`` begins with 8
bytes of SHA-256 of the module's name, its shape, the layout and the rest of the plan (:func:`plan_digest`), so
that a plan damaged in any bit, or moved to another module, is refused. Files of format 2 (written before the
digest) and of format 1 (integer tensors ``rows``, ``cols``, ``perm_rows``, ``perm_cols``) still load, unchecked
as they always were: saved again, they are written in format 3. FourierFT files are as they always were.

Every file written since issue 35 also names the basis of its coefficients in metadata ``s2ft_basis`` (a key of
:data:`s2ft.ops.bases.BASES`: ``"fourier"``, ``"dct"``, ``"haar"``, ``"haar2"`` ... for the Haar wavelet and its
number of levels), and reading refuses a file whose basis is not its config's (:func:`check_basis`), so that a
config edited by hand, or copied from another adapter, cannot read wavelet coefficients as Fourier ones (or the
reverse, or with another number of levels). The key changes nothing else in the file, so the format number
stays: a file without it (s2ft 0.1.0, which wrote Fourier and DCT files only, and the development versions since
that wrote wavelet files before the key) is read in the basis its config names, as it always was.

Reading checks what it can before it decodes anything: the format, the shapes (each bounded by the bytes of the
plan that must encode it, then compared with the model's) and the digests; a plan is decoded only then.
Everything is checked before the model is touched.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn

from s2ft.config import CONFIG_NAME, FourierFTConfig
from s2ft.io import atomic_write_group
from s2ft.ops.bases import BASES
from s2ft.ops.codec import (
    decode_locations,
    decode_permutation,
    encode_locations,
    encode_permutation,
    permutation_bound_bits,
    permutation_nbytes,
)
from s2ft.ops.permutation import is_permutation
from s2ft.tuner.kinds import layer_shape

WEIGHTS_NAME = "adapter_model.safetensors"
SAVE_PREFIX = "modules_to_save."
FORMAT_KEY, FORMAT_VERSION = "s2ft_format", "3"  # metadata: the version of a file that stores a plan
UNCHECKED_FORMAT = "2"  # plans without a digest (written before format 3): still read, unchecked
PLAN_DIGEST_BYTES = 8  # format 3: the digest at the start of each {module}.plan (plan_digest)
PLAN_KEY = "s2ft_plan"  # metadata: what each {module}.plan holds, in order ("p" permutations, "l" locations)
BASIS_KEY = "s2ft_basis"  # metadata: the coefficients' basis, a key of s2ft.ops.bases.BASES (check_basis)
FINGERPRINTS = "s2ft.fingerprints"  # uint8: W0's and the base-derived plans' digests (s2ft.tuner.planner)
_PLAN_PARTS = {"p": ("perm_rows", "perm_cols"), "l": ("rows", "cols")}
# what reading a damaged file can raise (safetensors, the codec, torch)
_CORRUPT = (
    SafetensorError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    IndexError,
    ArithmeticError,
)


def _names(state: dict[str, torch.Tensor]) -> list[str]:
    """The adapted modules of a file's tensors, sorted (the order of metadata ``s2ft_shapes``)."""
    return sorted(k.removesuffix(".coeffs") for k in state if k.endswith(".coeffs"))


def fold_groups(rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> list[torch.Tensor]:
    """Positions (increasing) in ``rows``/``cols`` ``(n,)`` of the locations that share a folded frequency
    ``(min(u, d_out - u), min(v, d_in - v))`` with two or three others: the FFT path
    (:func:`s2ft.ops.apply.spectral_apply`) adds their terms in the order of the locations, and three or more
    terms add to different float results in different orders. Groups in increasing folded frequency."""
    key = torch.minimum(rows, (-rows) % d_out) * (d_in // 2 + 1) + torch.minimum(cols, (-cols) % d_in)
    values, counts = torch.unique(key, return_counts=True)
    return [torch.nonzero(key == v).flatten() for v in values[counts >= 3].tolist()]


def _varint(value: int) -> torch.Tensor:
    out = []
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return torch.tensor(out, dtype=torch.uint8)


def _read_varint(blob: torch.Tensor) -> tuple[int, int]:
    value = 0
    for i, byte in enumerate(blob.tolist()):
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, i + 1
    raise ValueError("a plan ends inside its count of ordered groups")


def _encode_locations(rows, cols, d_out, d_in) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(blob, groups, order)``: the locations' set code, the trained order of every :func:`fold_groups` group
    (a count, then one permutation code per group), and the order ``(n,)`` to store the coefficients in: the
    set's canonical order but for each group, whose members keep their trained relative order."""
    blob, order = encode_locations(rows, cols, d_out, d_in)
    load = torch.arange(order.numel())
    codes = []
    for group in fold_groups(rows.long()[order], cols.long()[order], d_out, d_in):
        sigma = torch.argsort(order[group])  # the group's members by their trained position
        load[group] = group[sigma]
        codes.append(encode_permutation(sigma))
    return blob, torch.cat([_varint(len(codes)), *codes]), order[load]


def _decode_locations(plan: torch.Tensor, n: int, d_out: int, d_in: int, ordered: bool):
    """Invert :func:`_encode_locations` on ``plan`` (the group orders first when ``ordered``, then the set)."""
    sigmas = plan[:0]  # no group orders
    if ordered:
        count, start = _read_varint(plan)
        sigmas, plan = plan[start : start + count], plan[start + count :]
        if sigmas.numel() != count:
            raise ValueError("a plan ends inside its ordered groups")
    rows, cols = decode_locations(plan, n, d_out, d_in)
    groups = fold_groups(rows, cols, d_out, d_in)
    if len(groups) != len(sigmas):  # a file without part "o" has no such groups
        raise ValueError(f"a plan orders {len(sigmas)} groups of locations; its locations have {len(groups)}")
    index = torch.arange(n)
    for group, code in zip(groups, sigmas):
        index[group] = group[decode_permutation(code.reshape(1), group.numel())]
    return rows[index], cols[index]


def encode_plans(
    state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata (format 2) from an adapter's state (:func:`s2ft.tuner.saving.
    adapter_state`: int ``rows``/``cols`` ``(n,)``, ``perm_rows`` ``(d_out,)``, ``perm_cols`` ``(d_in,)``): each
    module's plan as one ``uint8`` ``{module}.plan`` (its parts in the order ``p``, ``o``, ``l`` of metadata
    ``s2ft_plan``) and its coefficients in the locations' canonical order, where the members of a
    :func:`fold_groups` group keep their trained relative order (part ``o``, in files that have such groups), so
    that every forward path computes what it computed before saving, bit for bit. A state without any plan
    (FourierFT) comes back as it is."""
    names = _names(state)
    layout = "".join(c for c, (key, _) in _PLAN_PARTS.items() if any(f"{n}.{key}" in state for n in names))
    if not layout and FINGERPRINTS not in state:
        return state, metadata
    for keys in _PLAN_PARTS.values():
        present = [f"{n}.{k}" in state for n in names for k in keys]
        if any(present) and not all(present):
            raise ValueError(f"every adapted module must store the same parts of its plan ({keys})")
    shapes = json.loads(metadata["s2ft_shapes"])
    out = {k: v for k, v in state.items() if not k.startswith(tuple(f"{n}." for n in names))}
    perms, locations = {}, {}
    for name, (d_out, d_in) in zip(names, shapes):
        coeffs = state[f"{name}.coeffs"]
        if "p" in layout:
            perms[name] = [
                encode_permutation(state[f"{name}.perm_rows"]),
                encode_permutation(state[f"{name}.perm_cols"]),
            ]
        if "l" in layout:
            blob, groups, order = _encode_locations(state[f"{name}.rows"], state[f"{name}.cols"], d_out, d_in)
            coeffs = coeffs[order]  # the order _decode_locations gives back
            locations[name] = (groups, blob)
        out[f"{name}.coeffs"] = coeffs.contiguous()
    if any(groups.numel() > 1 for groups, _ in locations.values()):
        layout = layout.replace("l", "ol")
    for name, shape in zip(names, shapes):
        blobs = perms.get(name, [])
        if name in locations:
            groups, blob = locations[name]
            blobs += [groups, blob] if "o" in layout else [blob]
        if blobs:
            plan = torch.cat(blobs)
            out[f"{name}.plan"] = torch.cat([plan_digest(name, shape, layout, plan), plan])
    return out, {**metadata, FORMAT_KEY: FORMAT_VERSION, PLAN_KEY: layout}


def plan_digest(name: str, shape: list[int], layout: str, plan: torch.Tensor) -> torch.Tensor:
    """The ``uint8`` ``(8,)`` digest a format-3 file stores before the plan ``plan`` of module ``name`` (its
    ``[d_out, d_in]`` ``shape``, the file's ``layout``): the first 8 bytes of SHA-256 of all four, so that a plan
    changed in any bit, or moved to another module, no longer matches."""
    h = hashlib.sha256(b"s2ft plan\0")
    h.update(json.dumps([name, list(shape), layout]).encode())
    h.update(plan.numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()[:PLAN_DIGEST_BYTES]), dtype=torch.uint8)


def check_format(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Refuse, before anything is decoded, a file whose ``s2ft_format`` this s2ft does not read: a newer format
    (upgrade s2ft), a value no s2ft writes, or plan tensors without the key."""
    version = metadata.get(FORMAT_KEY)
    plans = sorted(k for k in state if k.endswith(".plan"))
    if version is None:
        if plans:
            raise ValueError(
                f"it holds encoded plans ({plans[0]}) but no {FORMAT_KEY} metadata, which every file with "
                "them has: its metadata was altered; save the adapter again"
            )
        return
    if version in (UNCHECKED_FORMAT, FORMAT_VERSION):
        return
    if version.isdecimal() and len(version) < 6 and int(version) > int(FORMAT_VERSION):
        raise ValueError(
            f"it was written by a newer s2ft (file format {version}; this s2ft reads formats up to "
            f"{FORMAT_VERSION}): upgrade s2ft (pip install --upgrade s2ft)"
        )
    holds = f"it holds encoded plans ({plans[0]}), which" if plans else "files of"
    raise ValueError(
        f"its metadata {FORMAT_KEY} is {version[:20]!r}, which no s2ft writes ({holds} format "
        f"{UNCHECKED_FORMAT} or {FORMAT_VERSION} mark; files without encoded plans have no {FORMAT_KEY}): "
        "its metadata was altered; save the adapter again"
    )


def _layout(metadata: dict[str, str]) -> str:
    layout = metadata.get(PLAN_KEY, "") if metadata.get(FORMAT_KEY) else ""
    if layout not in ("", "p", "l", "ol", "pl", "pol"):
        raise ValueError(f"its metadata {PLAN_KEY} is {layout[:20]!r}, not a plan layout s2ft writes")
    return layout


def check_plans(
    state: dict[str, torch.Tensor], metadata: dict[str, str], shapes: dict[str, list[int]]
) -> None:
    """Before anything is decoded: every encoded plan is a 1-D ``uint8`` tensor at least as long as the
    permutations of its module's shape need (so a shape forged large is refused by the file's size: decoding it
    would take forever), no module holds more coefficients than its shape has entries, and in format 3 every
    plan matches its digest (:func:`plan_digest`, which covers the shape too; checked first)."""
    layout = _layout(metadata)
    digest = PLAN_DIGEST_BYTES if metadata.get(FORMAT_KEY) == FORMAT_VERSION else 0
    for name, (d_out, d_in) in shapes.items():
        coeffs = state.get(f"{name}.coeffs")
        if coeffs is not None and coeffs.numel() > d_out * d_in:
            raise ValueError(
                f"{name} holds {coeffs.numel()} coefficients, more than its {d_out}x{d_in} spectrum has entries"
            )
        plan = state.get(f"{name}.plan")
        if not layout:
            continue
        if plan is None or plan.dtype != torch.uint8 or plan.dim() != 1:
            raise ValueError(f"{name}.plan is missing or not a 1-D uint8 tensor; save the adapter again")
        if digest and (
            plan.numel() < digest
            or not torch.equal(plan[:digest], plan_digest(name, [d_out, d_in], layout, plan[digest:]))
        ):
            raise ValueError(
                f"the plan of {name} does not match its digest: the file was damaged or altered (or plans were "
                "moved between modules); save the adapter again from the trained model"
            )
        if "p" in layout:  # each permutation's code takes at least log2(d!) / 8 bytes (less 1 for rounding)
            least = (permutation_bound_bits(d_out) + permutation_bound_bits(d_in)) / 8 - 2
            if plan.numel() - digest < least:
                raise ValueError(
                    f"{name}.plan has {plan.numel()} bytes, too few for the permutations of the "
                    f"{d_out}x{d_in} shape its metadata gives (at least {least:.0f}): the file's shapes or plans "
                    "are corrupt; save the adapter again"
                )


def decode_plans(
    state: dict[str, torch.Tensor], metadata: dict[str, str], shapes: dict[str, list[int]]
) -> dict[str, torch.Tensor]:
    """Invert :func:`encode_plans`: the tensors of a file in format 2 or 3 with each ``{module}.plan`` decoded to
    int64 ``rows``/``cols`` ``(n,)`` and ``perm_rows``/``perm_cols``. Earlier files come back as they are.
    Checks :func:`check_format` and :func:`check_plans` first (call it with shapes already compared with the
    model's, :func:`check_shapes`); raises ``ValueError`` for a plan that is not the encoding of one."""
    check_format(state, metadata)
    check_plans(state, metadata, shapes)
    version = metadata.get(FORMAT_KEY)
    if version is None:
        return state
    layout = _layout(metadata)
    digest = PLAN_DIGEST_BYTES if version == FORMAT_VERSION else 0
    state = dict(state)
    for name in _names(state):
        stored = state.pop(f"{name}.plan", None)
        if not layout or stored is None:  # (check_plans refused a missing plan)
            continue
        plan = stored[digest:]
        (d_out, d_in), n = shapes[name], state[f"{name}.coeffs"].numel()
        if "p" in layout:
            split = (permutation_nbytes(d_out), permutation_nbytes(d_in))
            state[f"{name}.perm_rows"] = decode_permutation(plan[: split[0]], d_out)
            state[f"{name}.perm_cols"] = decode_permutation(plan[split[0] : sum(split)], d_in)
            plan = plan[sum(split) :]
        if "l" in layout:
            state[f"{name}.rows"], state[f"{name}.cols"] = _decode_locations(
                plan, n, d_out, d_in, "o" in layout
            )
        elif plan.numel():
            raise ValueError(f"{name}.plan has {plan.numel()} bytes more than its permutations")
    return state


def adapter_file_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes of the weights file of an adapter's state and metadata (:func:`encode_plans`, then
    safetensors): what :func:`write_adapter_folder` writes and ``adapter_nbytes`` counts."""
    return save(*encode_plans(state, metadata))


def file_parts(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, int]:
    """Bytes by part of the weights file of an adapter's state and metadata (as :func:`adapter_file_bytes`
    writes it): ``coefficients``, ``locations`` (with any fold-group orders), ``permutations``,
    ``modules_to_save``, ``fingerprint`` (the digests: 8 bytes per stored plan, :func:`plan_digest`, and those of
    ``W0`` in a file whose plan follows from the base weights; absent where there are none) and
    ``header`` (the 8-byte length, names, shapes, metadata and padding); they add up to the file's size."""
    encoded, meta = encode_plans(state, metadata)
    shapes = dict(zip(_names(encoded), json.loads(metadata["s2ft_shapes"])))
    parts = {"coefficients": 0, "locations": 0, "permutations": 0, "modules_to_save": 0}
    for key, value in encoded.items():
        size = value.numel() * value.element_size()
        if key == FINGERPRINTS:
            parts["fingerprint"] = parts.get("fingerprint", 0) + size
        elif key.startswith(SAVE_PREFIX):
            parts["modules_to_save"] += size
        elif key.endswith(".coeffs"):
            parts["coefficients"] += size
        elif key.endswith(
            ".plan"
        ):  # the digest, the permutations' codes, of known lengths; the locations' after
            d_out, d_in = shapes[key.removesuffix(".plan")]
            perms = permutation_nbytes(d_out) + permutation_nbytes(d_in) if "p" in meta[PLAN_KEY] else 0
            parts["fingerprint"] = parts.get("fingerprint", 0) + PLAN_DIGEST_BYTES
            parts["permutations"] += perms
            parts["locations"] += size - perms - PLAN_DIGEST_BYTES
        elif key.endswith((".rows", ".cols")):  # format 1, as written before
            parts["locations"] += size
        else:
            parts["permutations"] += size
    parts["header"] = len(save(encoded, metadata=meta)) - sum(parts.values())
    return parts


def metadata_shapes(metadata: dict[str, str], names: list[str]) -> dict[str, list[int]]:
    """``{module: [d_out, d_in]}`` from a file's metadata (``s2ft_shapes``, or ``s2ft_layers`` of earlier
    versions), for its adapted modules ``names``; a ``ValueError`` saying what is expected otherwise."""
    key = "s2ft_layers" if "s2ft_layers" in metadata else "s2ft_shapes"
    if key not in metadata:
        raise ValueError(
            "no s2ft_shapes metadata (the [d_out, d_in] of each adapted module, in the sorted order of their "
            "names), so it was not written by s2ft's save_pretrained; save the adapter again with it"
        )
    try:
        listed = json.loads(metadata[key])
    except ValueError:
        listed = None
    if key == "s2ft_layers" and isinstance(listed, dict):
        names, listed = list(listed), list(listed.values())
    if not isinstance(listed, list) or len(listed) != len(names):
        expected = "a JSON object {module: [d_out, d_in]}" if key == "s2ft_layers" else "a JSON list"
        expected += f" of the {len(names)} adapted modules' [d_out, d_in]"
        raise ValueError(
            f"metadata {key} must be {expected}, not {metadata[key][:80]!r}; save the adapter again"
        )
    for shape in listed:
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
            raise ValueError(f"metadata {key} holds {shape!r}, not a [d_out, d_in] of positive integers")
    return dict(zip(names, listed))


def open_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, list[int]]]:
    """The tensors (plans still encoded), metadata and shapes ``{module: [d_out, d_in]}`` of an adapter weights
    file, checked as far as the file alone allows without decoding anything (:func:`check_format`,
    :func:`check_plans`); a one-line ``ValueError`` naming the file otherwise. Compare the shapes with the
    model's (:func:`check_shapes`) before :func:`decode_plans`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        state = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except _CORRUPT as e:
        raise ValueError(
            f"adapter file {path} is truncated or corrupt ({type(e).__name__}: {e}); save the adapter again"
        ) from None
    try:
        check_format(state, metadata)
        shapes = metadata_shapes(metadata, _names(state))
        check_plans(state, metadata, shapes)
    except ValueError as e:
        raise ValueError(f"adapter file {path}: {e}") from None
    return state, metadata, shapes


def decode_file_plans(
    path: str, state: dict[str, torch.Tensor], metadata: dict[str, str], shapes: dict[str, list[int]]
) -> dict[str, torch.Tensor]:
    """:func:`decode_plans` of the file at ``path`` (:func:`open_adapter`), a plan that does not decode
    reported in one line naming the file."""
    try:
        return decode_plans(state, metadata, shapes)
    except _CORRUPT as e:
        raise ValueError(
            f"adapter file {path} is truncated or corrupt ({type(e).__name__}: {e}); save the adapter again"
        ) from None


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The tensors (plans decoded to int64 ``rows``/``cols``/``perm_rows``/``perm_cols``) and the shapes
    ``{module: [d_out, d_in]}`` of an adapter weights file, without a model to compare the shapes with (they are
    bounded by the plans' sizes, :func:`check_plans`); a one-line ``ValueError`` naming the file for a truncated
    or corrupt file or metadata of another kind."""
    state, metadata, shapes = open_adapter(path)
    return decode_file_plans(path, state, metadata, shapes), shapes


def describe_basis(basis: str) -> str:
    """A basis key of :data:`s2ft.ops.bases.BASES` in words (``"haar2"``: the 2-level Haar wavelet)."""
    if basis.startswith("haar"):
        levels = int(basis[4:] or 1)
        return f"the {levels}-level Haar wavelet basis ({basis!r}: wavelet_family 'db1', levels={levels})"
    return {"fourier": "the Fourier (DFT) basis ('fourier')", "dct": "the DCT-II basis ('dct')"}.get(
        basis, repr(basis)
    )


def check_basis(metadata: dict[str, str], config: FourierFTConfig) -> None:
    """Refuse a weights file whose metadata ``s2ft_basis`` names a basis other than ``config.basis`` (the config
    read with it): its coefficients would be read in another basis, a silently different ``ΔW``. A file without
    the key (written before it) is read in the config's basis, as it always was; a basis this s2ft does not know
    was written by a newer one."""
    stored = metadata.get(BASIS_KEY)
    if stored is None or stored == config.basis:
        return
    if stored not in BASES:
        raise ValueError(
            f"its coefficients are in a basis this s2ft does not know ({stored[:40]!r}; it knows {sorted(BASES)}): "
            "it was written by a newer s2ft, upgrade s2ft (pip install --upgrade s2ft)"
        )
    raise ValueError(
        f"its coefficients are in {describe_basis(stored)}, but its adapter_config.json (method "
        f"{config.method!r}) reads them in {describe_basis(config.basis)}, which would give another ΔW: the "
        "config was edited or comes from another adapter; use the adapter_config.json saved with these weights"
    )


def check_shapes(shapes: dict[str, list[int]], targets: list[tuple[str, nn.Module]]) -> None:
    """Raise a ``ValueError`` unless the file's adapted modules and their shapes are the model's ``targets``."""
    model_shapes = {name: list(layer_shape(module)) for name, module in targets}
    if set(model_shapes) != set(shapes):
        missing, extra = sorted(set(shapes) - set(model_shapes)), sorted(set(model_shapes) - set(shapes))
        raise ValueError(
            "the adapter does not fit this model: "
            f"adapted in the file but not found in the model: {missing[:5]}; targeted in the model but not in the file: {extra[:5]}"
        )
    for name, shape in model_shapes.items():
        if shapes[name] != shape:
            raise ValueError(
                f"the adapter does not fit this model: {name} is {shapes[name]} in the file, {shape} in the model"
            )


def check_adapter(
    state: dict[str, torch.Tensor],
    shapes: dict[str, list[int]],
    config: FourierFTConfig,
    targets: list[tuple[str, nn.Module]],
    saves: list[tuple[str, nn.Module]],
) -> None:
    """Raise a ``ValueError`` naming the first mismatch between the adapter file (plans decoded) and the model."""
    check_shapes(shapes, targets)
    n = config.n_frequency
    for name, _ in targets:
        d_out, d_in = shapes[name]
        # A method that does not store its locations (FourierFT) leaves them out: they follow from the seed.
        needed = (
            ("coeffs",)
            if not config.stores_locations and f"{name}.rows" not in state
            else ("coeffs", "rows", "cols")
        )
        for key in needed:
            t = state.get(f"{name}.{key}")
            if t is None or tuple(t.shape) != (n,):
                raise ValueError(f"adapter file: {name}.{key} is missing or not of shape ({n},)")
        coeffs = state[f"{name}.coeffs"]
        if not coeffs.is_floating_point():
            raise ValueError(
                f"adapter file: the coefficients of {name} are {coeffs.dtype}, not floating point"
            )
        if not torch.isfinite(coeffs).all():
            raise ValueError(f"adapter file: the coefficients of {name} hold NaN or infinite values")
        for key in ("rows", "cols", "perm_rows", "perm_cols"):
            t = state.get(f"{name}.{key}")
            if t is not None and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
                raise ValueError(f"adapter file: {name}.{key} is {t.dtype}; indices must be integers")
        _check_permutations(state, name, config)
        if "rows" not in needed:
            continue
        rows, cols = state[f"{name}.rows"].long(), state[f"{name}.cols"].long()
        if rows.min() < 0 or rows.max() >= d_out or cols.min() < 0 or cols.max() >= d_in:
            raise ValueError(f"adapter file: locations of {name} fall outside its {d_out}x{d_in} spectrum")
        if torch.unique(rows * d_in + cols).numel() != n:
            raise ValueError(f"adapter file: {name} has the same spectrum location more than once")
        if (f"{name}.perm_rows" in state) != (f"{name}.perm_cols" in state):
            raise ValueError(f"adapter file: {name} has only one of its two permutations")
        if f"{name}.perm_rows" in state and not (
            is_permutation(state[f"{name}.perm_rows"], d_out)
            and is_permutation(state[f"{name}.perm_cols"], d_in)
        ):
            raise ValueError(
                f"adapter file: the permutations of {name} are not permutations of its rows and columns"
            )
    for name, module in saves:
        prefix = f"{SAVE_PREFIX}{name}."
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        found = {k[len(prefix) :]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        if expected != found:
            raise ValueError(f"adapter file: the saved weights of {name} do not fit that module of the model")
        for key, value in state.items():
            if key.startswith(prefix) and value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(
                    f"adapter file: the saved weights of {name} ({key[len(prefix) :]}) hold NaN or infinite values; "
                    "save the adapter again from a model whose weights are finite"
                )


def _check_permutations(state: dict[str, torch.Tensor], name: str, config: FourierFTConfig) -> None:
    """Refuse a module whose stored permutations disagree with its config: S2FT with ``permute=True`` (plans
    from a prior) stores both; any other config stores none (a plan of the base weights recomputes them)."""
    stored = [k for k in ("perm_rows", "perm_cols") if f"{name}.{k}" in state]
    wanted = bool(getattr(config, "permute", False)) and config.stores_permutations
    if wanted and not stored:
        raise ValueError(
            f"adapter file: {name} stores no permutations (perm_rows, perm_cols), but its config says "
            "permute=True, so it would load with another ΔW; save the adapter again with its permutations"
        )
    if stored and not wanted:
        raise ValueError(
            f"adapter file: {name} stores permutations its {config.method!r} config does not use; the weights "
            "file and adapter_config.json are of different adapters: save the adapter again"
        )


def write_adapter_folder(
    directory: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str], config_text: str
) -> None:
    """Write the weights file (:func:`adapter_file_bytes`) and the config of an adapter folder together (all or
    nothing)."""
    encoded, encoded_metadata = encode_plans(state, metadata)  # what adapter_file_bytes counts

    def write_weights(tmp: str) -> None:
        save_file(encoded, tmp, metadata=encoded_metadata)

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_text)

    atomic_write_group(
        {
            os.path.join(directory, WEIGHTS_NAME): write_weights,
            os.path.join(directory, CONFIG_NAME): write_config,
        }
    )


def check_adapter_folder(path: str | os.PathLike) -> str:
    """``path`` as the adapter folder to read, or a clear error: given the weights file or the config file itself,
    say to pass the folder that holds them."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(
            f"{path} is a file; pass the adapter folder that holds {CONFIG_NAME} and {WEIGHTS_NAME} "
            f"({os.path.dirname(os.path.abspath(path))})"
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no adapter folder at {path}")
    return path
