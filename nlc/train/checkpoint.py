"""Checkpoints: one safetensors file that holds a whole generation, and a readable JSON beside it.

`checkpoint.safetensors` holds the model's weights (tied weights stored once), the optimiser state
under `optimizer/`, the tensors of the metadata (RNG states) under `meta/`, and in its header the
metadata itself as JSON. It is written atomically (temporary file + rename), so it is always one
complete generation: a crash at any moment leaves the previous file. `checkpoint.json` is the same
metadata for people and tools, written after it; when the two disagree (a crash between the two
renames), the safetensors header wins.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nlc.fsutil import write_atomic

WEIGHTS = "checkpoint.safetensors"
META = "checkpoint.json"
FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or made from another spec."""


def spec_sha256(path: str | Path) -> str:
    """The hash the spec's generated code carries: of the spec and every file it `use`s, so a checkpoint
    notices a change to a used file too. A spec that does not check is hashed as its bytes."""
    from nlc.spec.lower import load_spec

    spec, _, _ = load_spec(str(path))
    return spec.sha256 if spec is not None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_checkpoint(out_dir: str | Path, model: torch.nn.Module, optimizer_state: dict | None, meta: dict) -> None:
    """Write the model's weights, the optimiser state and `meta` (JSON values and tensors) to out_dir.

    meta should name `spec_path`, `spec_sha256`, `model_name` and `step`; `load_model` relies on them."""
    out_dir = Path(out_dir)
    for name in (WEIGHTS, META):
        for stale in out_dir.glob(f".{name}.*.tmp"):  # left by a writer killed mid-save
            stale.unlink(missing_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    aliases = _add_model(tensors, model.state_dict())
    header = {
        "format": FORMAT,
        "generation": uuid.uuid4().hex,
        "aliases": aliases,
        "meta": _flatten(meta, "meta", tensors),
        "optimizer": _flatten(optimizer_state, "optimizer", tensors),
    }
    write_atomic(out_dir / WEIGHTS, save_safetensors(tensors, metadata={"nlc": json.dumps(header)}))
    readable = {**header["meta"], "generation": header["generation"], "weights": WEIGHTS}  # tensors appear as {"__tensor__": name}
    write_atomic(out_dir / META, json.dumps(readable, indent=2, sort_keys=True) + "\n")


def read_checkpoint(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(model state_dict, optimiser state, meta) of the checkpoint in out_dir, all from one generation."""
    path = Path(out_dir) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in '{out_dir}' ({WEIGHTS} is missing)")
    raw = path.read_bytes()
    try:
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(json.loads(raw[8 : 8 + size])["__metadata__"]["nlc"])
        tensors = load_safetensors(raw)
    except Exception as e:  # any damage: a file not written by save_checkpoint
        raise CheckpointError(f"'{path}' is not a readable nlc checkpoint ({type(e).__name__}: {e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' has checkpoint format {header.get('format')}, this nlc reads format {FORMAT}")
    state_dict = {name: tensor for name, tensor in tensors.items() if not name.startswith(("optimizer/", "meta/"))}
    for alias, name in header["aliases"].items():
        state_dict[alias] = state_dict[name]
    return state_dict, _unflatten(header["optimizer"], tensors), _unflatten(header["meta"], tensors)


def check_spec(meta: dict, spec_path: str | Path) -> None:
    """Refuse a spec whose text, or that of a file it uses, differs from the one the checkpoint was trained on."""
    if not Path(spec_path).is_file():
        raise CheckpointError(f"the checkpoint's spec '{spec_path}' does not exist; pass the spec explicitly")
    actual = spec_sha256(spec_path)
    if actual != meta["spec_sha256"]:
        raise CheckpointError(
            f"the checkpoint was trained on a different spec: '{meta['spec_path']}' had sha256 {meta['spec_sha256'][:12]}..., "
            f"'{spec_path}' has sha256 {actual[:12]}...; use the same spec, or another --out directory"
        )


def load_model(out_dir: str | Path, spec_path: str | Path | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the checkpoint's model with `nlc.load` from its spec (or the given one, which must be the same
    text) and load its weights. Returns (model, meta)."""
    import nlc

    state_dict, _, meta = read_checkpoint(out_dir)
    spec_path = spec_path or meta["spec_path"]
    check_spec(meta, spec_path)
    model = nlc.load(str(spec_path), meta.get("model_name"))
    model.load_state_dict(state_dict)
    return model, meta


def _add_model(tensors: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Put each distinct tensor in once (safetensors refuses shared storage); return {alias: stored name}."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous().clone()
    return aliases


def _flatten(value, prefix: str, tensors: dict[str, torch.Tensor]):
    """A JSON skeleton of nested dicts, lists and tuples; tensors move into `tensors`, named by their path.
    A dict with keys other than strings is stored as pairs (an optimiser's state is keyed by parameter index)."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        items = [[key, _flatten(item, f"{prefix}/{key}", tensors)] for key, item in value.items()]
        plain = all(isinstance(key, str) and not key.startswith("__") for key in value)
        return dict(items) if plain else {"__dict__": items}
    if isinstance(value, (list, tuple)):
        items = [_flatten(item, f"{prefix}/{i}", tensors) for i, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {prefix})")


def _unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    if isinstance(skeleton, list):
        return [_unflatten(item, tensors) for item in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(_unflatten(item, tensors) for item in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {key: _unflatten(item, tensors) for key, item in skeleton["__dict__"]}
        return {key: _unflatten(item, tensors) for key, item in skeleton.items()}
    return skeleton
