"""Loading a transformers model straight from its safetensors onto its device (worker side).

``from_pretrained`` builds the model on the meta device too, but then runs its general loading
machinery (key renaming, weight conversions, dtype plans, device maps, initialising whatever the
checkpoint lacks). For the common case, a checkpoint whose tensors are exactly the model's
state dict, that machinery is overhead: :func:`load_direct` builds the empty model (parameters
on the meta device, buffers real), reads every tensor of the checkpoint onto the target device
(``safetensors.safe_open(..., device=...)``, or ``fastsafetensors`` when asked and installed),
assigns them (``load_state_dict(assign=True)``), ties the tied weights and moves the buffers
(rotary ``inv_freq`` and the like, computed by the model's constructor) to the device.

Anything it cannot load exactly raises :class:`Unsupported` with the reason *before* any weight
is read, and the worker falls back to ``from_pretrained``: no safetensors, remote code, a
quantised checkpoint, modules kept in float32 under a half dtype, a checkpoint tensor the model
does not have (renamed or converted keys), a shape mismatch, a weight missing from the checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOADERS = ("safetensors", "fastsafetensors", "from_pretrained")
DEFAULT_LOADER = "safetensors"  # measured: see bench/coldstart.py and the README's benchmarks


class Unsupported(Exception):
    """The direct loader cannot load this model exactly; the message says why."""


@dataclass
class Direct:
    model: Any
    loader: str
    build_s: float
    weights_s: float
    tensors: int
    files: int


def fastsafetensors_available() -> bool:
    return importlib.util.find_spec("fastsafetensors") is not None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of the model in ``path``: the shards its index names, or its one
    ``model.safetensors``. Raises Unsupported when there are none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Unsupported(f"its safetensors index cannot be read ({type(e).__name__})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise Unsupported(f"its safetensors index names a missing shard ({missing[0]})")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise Unsupported("it has no model.safetensors (or safetensors index)")


def _checkpoint_keys(files: list[Path]) -> dict[str, tuple[Path, list[int]]]:
    """Every tensor's name -> (file, shape), from the files' headers (no tensor is read)."""
    keys: dict[str, tuple[Path, list[int]]] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                keys[k] = (f, list(v.get("shape", [])))
    return keys


def check_supported(model_cls: Any, config: Any, *, trust_remote_code: bool, dtype: Any, torch: Any) -> None:
    """What rules the direct loader out before anything is built."""
    if trust_remote_code and getattr(config, "auto_map", None):
        raise Unsupported("its code comes with the model (trust_remote_code)")
    if getattr(config, "quantization_config", None):
        raise Unsupported("it is quantised")
    if dtype in (torch.float16, torch.bfloat16):
        try:
            cls = model_cls._model_mapping[type(config)] if hasattr(model_cls, "_model_mapping") else model_cls
        except KeyError:
            cls = None
        if cls is not None and (getattr(cls, "_keep_in_fp32_modules", None) or getattr(cls, "_keep_in_fp32_modules_strict", None)):
            raise Unsupported("it keeps some modules in float32 under a half dtype")


def build_empty(model_cls: Any, config: Any, dtype: Any, torch: Any) -> Any:
    """The model with its parameters on the meta device (not initialised) and its buffers real
    (on the CPU), as its constructor computes them. Raises Unsupported when that fails."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise Unsupported("accelerate is not installed") from None
    try:  # the weights are all read next: initialising them (on meta) is time for nothing
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    try:
        with init_empty_weights(include_buffers=False), no_init_weights():
            return model_cls.from_config(config, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any model that cannot be built so takes the usual path
        raise Unsupported(f"it cannot be built on the meta device ({type(e).__name__}: {e})") from None


def plan(model: Any, files: list[Path]) -> dict[str, Any]:
    """Check that the checkpoint is exactly the model's state dict (less tied weights) and return
    each checkpoint key's target tensor (on meta: its dtype is what the key is loaded as)."""
    expected = model.state_dict(keep_vars=True)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    # older checkpoints may hold buffers that the model now computes itself (position ids, say):
    # like from_pretrained, keep the model's own
    computed = {f"{name}.{b}" if name else b for name, module in model.named_modules()
                for b in module._non_persistent_buffers_set}
    found = _checkpoint_keys(files)
    targets: dict[str, Any] = {}
    for key, (_, shape) in found.items():
        target = expected.get(key)
        if target is None:
            if key in computed or any(p.search(key) for p in ignore):
                continue
            raise Unsupported(f"its checkpoint tensor {key!r} is not one of {type(model).__name__}'s")
        if list(target.shape) != shape:
            raise Unsupported(f"its checkpoint tensor {key!r} has shape {shape}, the model's is {list(target.shape)}")
        targets[key] = target
    return targets


def _read_safetensors(files: list[Path], keys: set[str], device: str, torch: Any):
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt", device=device) as st:
            for key in st.keys():
                if key in keys:
                    yield key, st.get_tensor(key)


def _read_fastsafetensors(files: list[Path], keys: set[str], device: str, torch: Any):
    from fastsafetensors import fastsafe_open

    # before 0.5 the tensors shared buffers that closing frees: those are copied
    copy = _version_tuple(importlib.metadata.version("fastsafetensors")) < (0, 5)
    nogds = not device.startswith("cuda")
    with fastsafe_open(filenames=[str(f) for f in files], device=device, nogds=nogds) as st:
        for key in st.keys():
            if key in keys:
                t = st.get_tensor(key)
                yield key, t.clone() if copy else t


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def read_into(model: Any, targets: dict[str, Any], files: list[Path], device: str, loader: str, torch: Any) -> int:
    """Read every planned tensor onto ``device`` (cast to its target's dtype) and assign them."""
    read = _read_fastsafetensors if loader == "fastsafetensors" else _read_safetensors
    state: dict[str, Any] = {}
    for key, t in read(files, set(targets), device, torch):
        want = targets[key].dtype
        state[key] = t if t.dtype == want else t.to(want)
    model.load_state_dict(state, strict=False, assign=True)
    return len(state)


def finish(model: Any, device: str, torch: Any) -> None:
    """Tie the tied weights, move the buffers to ``device``, and check that nothing is left on meta."""
    model.tie_weights()
    dev = torch.device(device)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta and buf.device != dev:
                module._buffers[name] = buf.to(dev)
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    left += [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    if left:
        raise Unsupported(f"{len(left)} of its tensors are not in the checkpoint (the first: {left[0]})")


def load_direct(path: Path, model_cls: Any, config: Any, *, dtype: Any, device: str, torch: Any,
                loader: str = DEFAULT_LOADER, trust_remote_code: bool = False) -> Direct:
    """Build ``model_cls`` from ``config`` on the meta device and load ``path``'s safetensors
    straight onto ``device`` in ``dtype``. Raises Unsupported (nothing read yet, or what was
    read is dropped) when the model needs ``from_pretrained``."""
    if loader not in ("safetensors", "fastsafetensors"):
        raise ValueError(f"unknown direct loader {loader!r}")
    if loader == "fastsafetensors" and not fastsafetensors_available():
        raise Unsupported("fastsafetensors is not installed")
    t0 = time.perf_counter()
    files = checkpoint_files(path)
    check_supported(model_cls, config, trust_remote_code=trust_remote_code, dtype=dtype, torch=torch)
    model = build_empty(model_cls, config, dtype, torch)
    targets = plan(model, files)
    t1 = time.perf_counter()
    n = read_into(model, targets, files, device, loader, torch)
    finish(model, device, torch)
    model.eval()
    gen = path / "generation_config.json"
    if gen.is_file() and getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return Direct(model=model, loader=loader, build_s=t1 - t0, weights_s=time.perf_counter() - t1,
                  tensors=n, files=len(files))
