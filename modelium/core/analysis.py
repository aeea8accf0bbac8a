"""Model discovery and analysis: a model folder -> :class:`ModelSpec` | :class:`Invalid`.

Layer 1, pure: standard library, ``msgspec``, PyYAML (``yaml.safe_load`` for model-card front
matter) and :mod:`modelium.core.messages` only. Nothing here imports torch, transformers, trio or
sqlite, and nothing loads weights: a safetensors file is read up to its header (an 8-byte
little-endian length, then a JSON object naming each tensor's dtype, shape and byte range), so
the analysis of a 100 GB checkpoint reads a few megabytes.

What a model folder is
    ``config.json`` plus weights. Weights are ``*.safetensors`` (one file, or shards listed by
    ``model.safetensors.index.json``). Pickle weights (``.bin``/``.pt``/``.pth``/``.ckpt``) are
    refused unless ``AnalysisOptions.allow_pickle``; they are ignored (with a note) when
    safetensors are present. GGUF and ONNX folders are refused (not supported yet).
    A sentence-transformers folder (``modules.json``) is an embedding model; its pooling comes
    from the Pooling module's ``config.json``.
    A ``modelium.yaml`` beside the files holds the model's own settings: ``backend: vllm`` (or
    ``transformers``) overrides the backend the analysis would choose; an unknown backend or
    setting makes the folder invalid.

Which files are looked at
    Dot-files and dot-folders (``.git``, ``.cache``, ``.gitattributes`` ...) are skipped
    everywhere: by :func:`fingerprint`, :func:`scan_root` and :func:`analyse`. Sub-folders are
    walked up to :data:`MAX_DEPTH` levels deep; symlinked folders are followed once each.

Rules of :func:`analyse`
    It never raises for bad input: every problem becomes :class:`Invalid` with a reason that
    names the file and what is wrong with it. ``Invalid.fingerprint`` is set too, so that the
    watcher does not re-analyse a broken folder until its files change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping, NamedTuple

import msgspec
import yaml

from modelium.core.messages import ModelSpec

__all__ = [
    "Invalid", "AnalysisOptions", "FolderState", "sanitize_name", "fingerprint", "scan_root",
    "diff", "analyse", "read_safetensors_header", "SafetensorsError",
    "VLLM_ARCHITECTURES", "DTYPE_BITS", "implied_params",
]

MAX_DEPTH = 8  # folder levels walked below a model folder
MAX_NAME = 128
JSON_LIMIT = 64 * 2**20  # largest config/index JSON file read
HEADER_LIMIT = 100_000_000  # the safetensors format's own limit on a header
README_LIMIT = 256 * 2**10  # bytes of README.md read for its front matter
DEFAULT_CONTEXT = 4096

# bits per element of every safetensors dtype
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FN": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_TORCH_DTYPE_BYTES = {"float16": 2, "half": 2, "bfloat16": 2, "float32": 4, "float": 4,
                      "float64": 8, "double": 8}

# architectures the vLLM backend is recommended for (decoder LLMs vLLM supports natively)
VLLM_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
    "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "PhiForCausalLM", "Phi3ForCausalLM", "PhimoeForCausalLM",
    "GPT2LMHeadModel", "GPTNeoXForCausalLM", "GPTJForCausalLM", "GPTBigCodeForCausalLM",
    "FalconForCausalLM", "OPTForCausalLM", "BloomForCausalLM", "MPTForCausalLM",
    "StableLmForCausalLM", "Starcoder2ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
    "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "CohereForCausalLM",
    "GraniteForCausalLM", "InternLM2ForCausalLM",
})

_SEQ2SEQ_TYPES = frozenset({
    "t5", "mt5", "umt5", "longt5", "bart", "mbart", "marian", "pegasus", "pegasus_x", "led",
    "bigbird_pegasus", "m2m_100", "nllb-moe", "fsmt", "prophetnet", "xlm-prophetnet",
    "blenderbot", "blenderbot-small", "plbart", "mvp", "switch_transformers", "encoder-decoder",
})
# encoder-decoders whose input is not text (speech, images): not served as seq2seq text
_NON_TEXT_TYPES = frozenset({
    "whisper", "speech_to_text", "speech-encoder-decoder", "vision-encoder-decoder",
    "seamless_m4t", "seamless_m4t_v2", "pix2struct", "donut-swin", "trocr", "musicgen",
})
_ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "albert", "electra",
    "deberta", "deberta-v2", "mpnet", "camembert", "modernbert", "nomic_bert", "ernie",
    "mobilebert", "xlm", "funnel", "squeezebert", "convbert", "luke", "megatron-bert", "rembert",
    "roformer", "data2vec-text", "nezha", "esm", "new", "jina_bert", "xlnet",
})

_PICKLE_EXT = (".bin", ".pt", ".pth", ".ckpt")
# pickle files a training run leaves next to the weights: never weights themselves
_NOT_WEIGHTS = re.compile(
    r"^(training_args\.bin|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$"
)
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# a model folder's own settings: ``modelium.yaml`` beside its files (read by _model_settings)
MODEL_SETTINGS_FILE = "modelium.yaml"
MODEL_SETTINGS_LIMIT = 64 * 2**10
KNOWN_BACKENDS = ("transformers", "vllm")  # the names of modelium.backends.BACKENDS
VLLM_TASKS = ("text-generation", "chat", "embedding")  # what the vLLM backend serves


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


class Invalid(msgspec.Struct, frozen=True, kw_only=True):
    """A folder that is not a servable model, and why (a sentence a person can act on)."""

    name: str
    path: str
    reason: str
    fingerprint: str = ""


@dataclass(frozen=True)
class AnalysisOptions:
    allow_pickle: bool = False  # .bin/.pt/.pth/.ckpt weights refused unless True
    trust_remote_code: bool = False  # configs with auto_map refused unless True
    context_tokens: int | None = None  # KV budget context; default min(max_context, 4096)
    concurrency: int = 1  # sequences the KV budget is sized for
    gpu_present: bool = False
    vllm_available: bool = False
    runtime_overhead_bytes: int = 384 * 2**20  # fixed per-process runtime cost (torch, CUDA ctx)


class FolderState(NamedTuple):
    name: str  # the folder's name as found on disk (not yet sanitised)
    path: str
    fingerprint: str
    newest_mtime: float  # newest mtime of the folder and its files: tells a copy in progress


_NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class _Entry(msgspec.Struct):
    """One tensor of a safetensors header (``__metadata__`` is removed before decoding)."""

    dtype: str
    shape: list[_NonNeg]
    data_offsets: tuple[_NonNeg, _NonNeg]


_HEADER_DECODER = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENTRY_DECODER = msgspec.json.Decoder(_Entry)


class SafetensorsError(ValueError):
    """A safetensors file whose header cannot be trusted; the message names the problem."""


class _Bad(Exception):
    """Raised inside the analysis; :func:`analyse` turns it into :class:`Invalid`."""


# --------------------------------------------------------------------------------------------
# Names, fingerprints, scanning
# --------------------------------------------------------------------------------------------


def sanitize_name(name: str) -> str | None:
    """``name`` if it is a safe model name, else None.

    Safe: 1 to 128 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit
    (so no leading ``.`` or ``-``), and no ``..`` anywhere. That excludes ``/``, ``\\``,
    spaces, control characters, ``:`` and ``@``: a model name appears in URLs, file names, log
    rows and command lines, and this set is safe in all of them. The name is never rewritten:
    a folder whose name fails is reported as invalid, so that two folders cannot map to the
    same name.
    """
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        return None
    if not _NAME_RE.fullmatch(name) or ".." in name:
        return None
    return name


def _folder_state(folder: str) -> tuple[str, float] | None:
    """(fingerprint, newest mtime) of a folder from stats only; None if it cannot be listed."""
    try:
        top = os.stat(folder)
    except OSError:
        return None
    newest = top.st_mtime
    items: list[str] = []
    seen = {(top.st_dev, top.st_ino)}
    stack: list[tuple[str, str, int]] = [("", folder, 0)]
    while stack:
        rel, path, depth = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            if depth == 0:
                return None
            continue
        for e in entries:
            name = e.name
            if name.startswith("."):
                continue
            try:
                if e.is_dir():
                    if depth < MAX_DEPTH:
                        if e.is_symlink():
                            st = e.stat()
                            key = (st.st_dev, st.st_ino)
                            if key in seen:
                                continue
                            seen.add(key)
                        stack.append((rel + name + "/", e.path, depth + 1))
                    continue
                st = e.stat()
            except OSError:
                continue  # vanished or dangling: not part of the content
            if not stat.S_ISREG(st.st_mode):
                continue
            items.append(f"{rel}{name}\0{st.st_size}\0{st.st_mtime_ns}")
            if st.st_mtime > newest:
                newest = st.st_mtime
    items.sort()
    digest = hashlib.blake2b("\n".join(items).encode("utf-8", "surrogateescape"), digest_size=16)
    return digest.hexdigest(), newest


def fingerprint(folder: Path) -> str:
    """A cheap content version of a folder: a hash of (relative name, size, mtime_ns) of each
    of its regular files (recursive, dot-entries skipped). Rewriting, adding or removing a file
    changes it; reading nothing but stats, it does not notice a same-size rewrite that keeps
    the mtime. Returns "" for a folder that cannot be listed."""
    state = _folder_state(os.fspath(folder))
    return state[0] if state else ""


def scan_root(root: Path) -> dict[str, FolderState]:
    """Candidate model folders directly under ``root``: every sub-folder (or symlink to one)
    whose name does not start with ``.``, keyed by its name on disk. Stats only; entries that
    cannot be read are skipped; never raises (a missing root gives ``{}``)."""
    out: dict[str, FolderState] = {}
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except OSError:
        return out
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            if not e.is_dir():
                continue
        except OSError:
            continue
        state = _folder_state(e.path)
        if state is not None:
            out[e.name] = FolderState(e.name, e.path, state[0], state[1])
    return out


def diff(
    previous: Mapping[str, str], current: Mapping[str, str]
) -> tuple[list[str], list[str], list[str]]:
    """(added, changed, removed) names between two ``name -> fingerprint`` maps, each sorted."""
    added = sorted(n for n in current if n not in previous)
    removed = sorted(n for n in previous if n not in current)
    changed = sorted(n for n, fp in current.items() if n in previous and previous[n] != fp)
    return added, changed, removed


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path | str, label: str | None = None) -> dict[str, tuple[str, int, int]]:
    """``{tensor name: (dtype, element count, byte size)}`` from a safetensors file's header,
    checked against the file's size without reading the weights.

    Raises :class:`SafetensorsError` naming the file (``label``) and the problem: a header
    length past the end of the file (truncated), a header that is not JSON, an unknown dtype, a
    bad shape, data_offsets past the end of the file, a byte range that does not match
    shape x dtype, overlapping or non-contiguous tensors (what the safetensors loader rejects).
    """
    label = label or os.path.basename(os.fspath(path))
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise SafetensorsError(
                    f"{label} is {size} bytes: too small to be a safetensors file "
                    "(it must start with an 8-byte header length)")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise SafetensorsError(
                    f"{label}: truncated header: the header length says {n} bytes but only "
                    f"{size - 8} bytes follow (the file is cut short or is not safetensors)")
            if n > HEADER_LIMIT:
                raise SafetensorsError(
                    f"{label}: header of {n} bytes is larger than the safetensors limit of "
                    f"{HEADER_LIMIT} bytes")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{label}: cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise SafetensorsError(f"{label}: truncated header: read {len(raw)} of {n} bytes")
    try:
        header = _HEADER_DECODER.decode(raw)
    except msgspec.ValidationError:
        raise SafetensorsError(f"{label}: the header is not a JSON object") from None
    except msgspec.DecodeError as e:
        raise SafetensorsError(f"{label}: the header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    tensors: dict[str, tuple[str, int, int]] = {}
    spans: list[tuple[int, int, str]] = []
    decode_entry, prod, bits_of = _ENTRY_DECODER.decode, math.prod, DTYPE_BITS.get
    for name, entry_raw in header.items():
        try:
            entry = decode_entry(entry_raw)
        except msgspec.DecodeError as e:  # ValidationError included: names the field
            raise SafetensorsError(
                f"{label}: tensor {name!r}: bad header entry ({e}); expected dtype, shape (list "
                "of non-negative ints) and data_offsets [begin, end]") from None
        dtype, shape, (begin, end) = entry.dtype, entry.shape, entry.data_offsets
        bits = bits_of(dtype)
        if bits is None:
            raise SafetensorsError(f"{label}: tensor {name!r} has unknown dtype {dtype!r}")
        if begin > end:
            raise SafetensorsError(
                f"{label}: tensor {name!r} has data_offsets [{begin}, {end}]: begin after end")
        numel = prod(shape)
        nbits = numel * bits
        if nbits % 8:
            raise SafetensorsError(
                f"{label}: tensor {name!r}: {numel} elements of {dtype} do not fill whole bytes")
        nbytes = nbits // 8
        if end > data_size:
            raise SafetensorsError(
                f"{label}: tensor {name!r} data_offsets [{begin}, {end}] go past the end of the "
                f"file: the data section holds only {data_size} bytes (file truncated, or the "
                "header lies)")
        if end - begin != nbytes:
            raise SafetensorsError(
                f"{label}: tensor {name!r} is {dtype} {shape} = {nbytes} bytes but its "
                f"data_offsets [{begin}, {end}] span {end - begin} bytes (the header lies)")
        spans.append((begin, end, name))
        tensors[name] = (dtype, numel, nbytes)
    spans.sort()
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise SafetensorsError(
                f"{label}: tensor {name!r} (bytes {begin}-{end}) overlaps tensor {prev!r} "
                f"(which ends at byte {pos}) (the header lies)")
        if begin > pos:
            raise SafetensorsError(
                f"{label}: {begin - pos} bytes between offsets {pos} and {begin} (before tensor "
                f"{name!r}) belong to no tensor; safetensors data must be contiguous")
        pos, prev = end, name
    if pos != data_size:
        raise SafetensorsError(
            f"{label}: the tensors cover {pos} bytes but the data section holds {data_size} "
            "bytes (trailing bytes: the header does not describe the whole file)")
    return tensors


# --------------------------------------------------------------------------------------------
# helpers for analyse
# --------------------------------------------------------------------------------------------


def _read_json(path: Path, label: str) -> Any:
    try:
        st = path.stat()
    except OSError as e:
        raise _Bad(f"{label}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Bad(f"{label} is not a regular file")
    if st.st_size > JSON_LIMIT:
        raise _Bad(f"{label} is {st.st_size} bytes, over the {JSON_LIMIT} byte limit for JSON files")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Bad(f"{label}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Bad(f"{label} is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad(f"{label} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise _Bad(f"{label} is not usable JSON: nested too deeply") from None


def _json_object(path: Path, label: str) -> dict:
    value = _read_json(path, label)
    if not isinstance(value, dict):
        raise _Bad(f"{label} must hold a JSON object, not a {type(value).__name__}")
    return value


def _first_int(config: Mapping, *keys: str) -> int | None:
    for k in keys:
        v = config.get(k)
        if type(v) is int and v > 0:
            return v
    return None


def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _escaping_symlink(folder: Path, root: Path) -> str | None:
    """The reason if ``folder`` or a symlink inside it resolves outside ``root``."""
    root_real = os.path.realpath(root)
    start = os.fspath(folder)
    if not _inside(start, root_real):
        if not _inside(os.path.dirname(os.path.abspath(start)), root_real):
            return f"{start} is not inside the models folder {root_real}"
        return (f"symlink {start} -> {os.path.realpath(start)} leaves the models folder "
                f"{root_real}; copy the model into the models folder instead")
    seen = {os.path.realpath(start)}
    stack = [(start, "", 0)]
    while stack:
        path, rel, depth = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            try:
                link = e.is_symlink()
                is_dir = e.is_dir()
            except OSError:
                continue
            if link:
                target = os.path.realpath(e.path)
                if not _inside(target, root_real):
                    return (f"symlink {rel + e.name!r} -> {target} leaves the models folder "
                            f"{root_real}; copy the file into the model folder instead")
                if not is_dir or target in seen:
                    continue
                seen.add(target)
            if is_dir and depth < MAX_DEPTH and not e.name.startswith("."):
                stack.append((e.path, rel + e.name + "/", depth + 1))
    return None


def _front_matter(folder: Path, notes: list[str]) -> tuple[str, list[str]]:
    """(license, tags) from README.md's YAML front matter."""
    path = folder / "README.md"
    try:
        with open(path, "rb") as f:
            head = f.read(README_LIMIT)
    except OSError:
        return "", []
    text = head.decode("utf-8", "replace").lstrip("\ufeff")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return "", []
    for i, line in enumerate(lines[1:], 1):
        if line.strip() in ("---", "..."):
            block = "\n".join(lines[1:i])
            break
    else:
        notes.append("README.md front matter has no closing '---'; license and tags not read")
        return "", []
    try:
        meta = yaml.safe_load(block)
    except yaml.YAMLError as e:
        notes.append(f"README.md front matter is not valid YAML ({str(e).splitlines()[0]}); "
                     "license and tags not read")
        return "", []
    if not isinstance(meta, dict):
        return "", []
    lic = meta.get("license")
    if isinstance(lic, list):
        lic = ", ".join(str(x) for x in lic if isinstance(x, (str, int, float)))
    lic = str(lic) if isinstance(lic, (str, int, float)) else ""
    if lic == "other" and isinstance(meta.get("license_name"), str):
        lic = f"other ({meta['license_name']})"
    tags = meta.get("tags")
    if isinstance(tags, str):
        tags = [tags]
    tags = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
    return lic, tags


def _pooling_mode(cfg: Mapping) -> str:
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str) and mode:
        return mode
    flags = (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
             ("pooling_mode_max_tokens", "max"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
             ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))
    return "+".join(name for key, name in flags if cfg.get(key) is True)


def _safe_rel(rel: str) -> bool:
    parts = rel.replace("\\", "/").split("/")
    return not rel.startswith(("/", "\\")) and ".." not in parts


def _classify(arch: str, model_type: str, config: Mapping, notes: list[str]) -> tuple[str, str]:
    """(task, default pooling) from the architecture name and model type."""
    encdec = config.get("is_encoder_decoder") is True
    if model_type in _NON_TEXT_TYPES:
        notes.append(f"{arch or model_type}: speech/vision model; task unknown (not served yet)")
        return "unknown", ""
    if arch.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return "classification", ""
    if arch.endswith("ForMaskedLM"):
        return "fill-mask", ""
    if arch.endswith("ForCausalLM"):
        return "text-generation", ""
    seq2seq_type = model_type in _SEQ2SEQ_TYPES or encdec
    if seq2seq_type and arch.endswith(("ForConditionalGeneration", "LMHeadModel", "MTModel")):
        return "seq2seq", ""  # T5ForConditionalGeneration, MarianMTModel, T5WithLMHeadModel ...
    if arch.endswith("ForConditionalGeneration"):
        notes.append(f"{arch}: conditional generation of a non-text-to-text model "
                     "(multimodal?); task unknown")
        return "unknown", ""
    if arch.endswith("LMHeadModel"):
        return "text-generation", ""
    if seq2seq_type and not arch.endswith("EncoderModel"):
        notes.append(f"{arch}: encoder-decoder without a generation head; task unknown")
        return "unknown", ""
    if arch.endswith("EncoderModel") or (arch.endswith("Model") and model_type in _ENCODER_TYPES):
        notes.append(f"{arch}: bare encoder served as an embedding model; no sentence-transformers "
                     "pooling config, mean pooling assumed")
        return "embedding", "mean"
    if arch.endswith("Model") and "For" not in arch:
        notes.append(f"{arch}: bare decoder served as an embedding model; no sentence-transformers "
                     "pooling config, last-token pooling assumed")
        return "embedding", "lasttoken"
    if arch:
        notes.append(f"architecture {arch} has no known task; task unknown")
    else:
        notes.append("config.json names no architectures; task unknown")
    return "unknown", ""


def _kv_bytes_per_token(config: Mapping, model_type: str, dtype_bytes: int,
                        notes: list[str]) -> int:
    layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _first_int(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model")
    kv_heads = _first_int(config, "num_key_value_heads", "num_kv_heads", "n_head_kv",
                          "multi_query_group_num")
    if model_type == "falcon" and not config.get("new_decoder_architecture") and config.get("multi_query", True):
        kv_heads = 1
    elif kv_heads is None and config.get("multi_query") is True:
        kv_heads = 1
    kv_heads = kv_heads or heads
    head_dim = _first_int(config, "head_dim")
    if head_dim is None and hidden and heads and hidden % heads == 0:
        head_dim = hidden // heads
    missing = [n for n, v in (("layer count", layers), ("attention heads", kv_heads),
                              ("head dim", head_dim)) if not v]
    if missing:
        notes.append(f"KV cache size unknown: config.json lacks {', '.join(missing)}; "
                     "estimate has no KV budget")
        return 0
    return 2 * layers * kv_heads * head_dim * dtype_bytes


# dense transformer stacks whose size config.json fully states: a gated MLP (gate, up, down
# projections) or a plain one (in, out). Other kinds (MoE, multimodal, odd layouts) are not checked.
_GATED_MLP_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2", "phi3",
    "stablelm", "internlm2", "cohere",
})
_PLAIN_MLP_TYPES = frozenset({
    "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "starcoder2", "phi", "bert", "roberta", "xlm-roberta",
})
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")
CONFIG_MISMATCH_FACTOR = 2  # config.json may imply up to this many times the stored parameters


def implied_params(config: Mapping, model_type: str) -> tuple[int, str] | None:
    """A lower bound on the parameters ``config`` describes, and the config figures it rests on;
    None for a kind this does not know, or a config that does not state every figure needed.

    Counted: the token embedding and, in each layer, the attention projections and the MLP;
    not counted: a separate LM head (it may be tied to the embedding), learned positions,
    biases and norms. A model whose weights match its config holds at least this many."""
    gated = model_type in _GATED_MLP_TYPES
    if not gated and model_type not in _PLAIN_MLP_TYPES:
        return None
    if any(config.get(k) for k in _MOE_KEYS) or isinstance(config.get("quantization_config"), dict):
        return None
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model")
    layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    vocab = _first_int(config, "vocab_size", "padded_vocab_size")
    heads = _first_int(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
    inter = _first_int(config, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")
    if inter is None and model_type in ("gpt2", "gptj", "gpt_bigcode") and hidden:
        inter = 4 * hidden  # their n_inner defaults to 4 x n_embd
    if not (hidden and layers and vocab and heads and inter):
        return None
    kv_heads = _first_int(config, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv_heads is None and config.get("multi_query") is True:
        kv_heads = 1
    kv_heads = kv_heads or heads
    head_dim = _first_int(config, "head_dim") or hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    per_layer = 2 * hidden * q_dim + 2 * hidden * kv_dim + (3 if gated else 2) * hidden * inter
    total = vocab * hidden + layers * per_layer
    figures = (f"hidden_size {hidden}, {layers} layers, vocab_size {vocab}, "
               f"intermediate_size {inter}, {heads} attention heads")
    return total, figures


def _check_config_against_weights(config: Mapping, model_type: str, params_per_dtype: Mapping[str, int],
                                  tensor_names: list[str], notes: list[str]) -> None:
    """Raise :class:`_Bad` when config.json describes a larger model than the safetensors hold:
    loading builds the model config.json describes (the weights missing from the files are
    initialised at random), so its memory follows config.json, not the files. Tolerant: kinds
    it does not know, quantized weights and configs that omit a figure are not checked."""
    held = sum(params_per_dtype.values())
    floats = sum(n for d, n in params_per_dtype.items() if d in _FLOAT_DTYPES)
    if not held or floats < 0.9 * held:
        return  # packed or integer weights: element counts are not parameter counts
    implied = implied_params(config, model_type)
    if implied is not None:
        count, figures = implied
        if count > CONFIG_MISMATCH_FACTOR * held:
            raise _Bad(f"config.json implies {count:.2g} parameters ({figures}) but the safetensors "
                       f"hold {held:.2g}: config.json does not describe these weights (loading it "
                       "would build the larger model); fix config.json or the weights")
    if model_type not in _GATED_MLP_TYPES and model_type not in _PLAIN_MLP_TYPES:
        return
    layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    indices = {int(m.group(1)) for n in tensor_names if (m := _LAYER_INDEX.search(n))}
    if layers and indices:
        stored = max(indices) + 1
        if layers > stored:
            raise _Bad(f"config.json says {layers} layers but the safetensors hold {stored} "
                       f"(layer indices 0-{stored - 1}): config.json does not describe these "
                       "weights (loading it would add layers with random weights)")
        if layers < stored:
            notes.append(f"the safetensors hold {stored} layers, config.json uses {layers}")


# --------------------------------------------------------------------------------------------
# analyse
# --------------------------------------------------------------------------------------------


def analyse(
    folder: Path,
    *,
    name: str | None = None,
    root: Path | None = None,
    options: AnalysisOptions = AnalysisOptions(),
) -> ModelSpec | Invalid:
    """What the model folder ``folder`` is, read from its JSON files and safetensors headers.

    ``name`` defaults to the folder's name; ``root`` (the models folder), when given, is the
    boundary no symlink may leave. Never raises for bad input: returns :class:`Invalid`.
    """
    folder = Path(folder)
    path = os.path.abspath(folder)
    name = folder.name if name is None else name
    fp = fingerprint(folder)
    try:
        return _analyse(folder, path, name, fp, root, options)
    except _Bad as e:
        return Invalid(name=name, path=path, reason=str(e), fingerprint=fp)
    except SafetensorsError as e:
        return Invalid(name=name, path=path, reason=str(e), fingerprint=fp)
    except Exception as e:  # a bug here must not take the watcher down
        return Invalid(name=name, path=path, fingerprint=fp,
                       reason=f"analysis failed unexpectedly: {type(e).__name__}: {e}")


def _analyse(folder: Path, path: str, name: str, fp: str, root: Path | None,
             options: AnalysisOptions) -> ModelSpec:
    if sanitize_name(name) is None:
        raise _Bad(f"model name {name!r} is not allowed: use 1-{MAX_NAME} characters from "
                   "A-Z a-z 0-9 . _ - starting with a letter or digit, without '..' "
                   "(rename the folder)")
    if not folder.is_dir():
        raise _Bad(f"{path} is not a folder" if folder.exists() else f"{path} does not exist")
    if root is not None:
        reason = _escaping_symlink(folder, Path(root))
        if reason:
            raise _Bad(reason)
    if not fp:
        raise _Bad(f"cannot list the folder {path}")
    notes: list[str] = []
    try:
        top = sorted(e.name for e in os.scandir(folder)
                     if not e.name.startswith(".") and e.is_file())
    except OSError as e:
        raise _Bad(f"cannot list the folder {path}: {e.strerror or e}") from None
    files = set(top)
    own = _model_settings(folder) if MODEL_SETTINGS_FILE in files else {}

    # sentence-transformers layout: modules.json names the transformer and pooling modules
    model_dir, st_pooling, st_pooling_note = folder, "", ""
    normalize = False
    is_st = "modules.json" in files
    if is_st:
        modules = _read_json(folder / "modules.json", "modules.json")
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise _Bad("modules.json must hold a JSON list of module objects")
        for m in modules:
            mtype, mpath = str(m.get("type", "")), m.get("path", "")
            if not isinstance(mpath, str) or not _safe_rel(mpath):
                raise _Bad(f"modules.json: module {m.get('name')!r} has path {mpath!r} outside the folder")
            if mtype.endswith(".Transformer") and mpath:
                model_dir = folder / mpath
            elif mtype.endswith(".Pooling"):
                pcfg_path = folder / mpath / "config.json"
                label = f"{mpath}/config.json" if mpath else "config.json"
                if pcfg_path.is_file():
                    st_pooling = _pooling_mode(_json_object(pcfg_path, label))
                if not st_pooling:
                    st_pooling = "mean"
                    st_pooling_note = (f"pooling module config {label} missing or names no mode; "
                                       "mean pooling assumed (the sentence-transformers default)")
            elif mtype.endswith(".Normalize"):
                normalize = True
                notes.append("sentence-transformers: embeddings are L2-normalised")
            elif mtype.endswith(".Dense"):
                notes.append(f"sentence-transformers Dense module {mpath!r}: its weights are not "
                             "counted in param_count")
        if model_dir != folder:
            try:
                files = {e.name for e in os.scandir(model_dir)
                         if not e.name.startswith(".") and e.is_file()}
            except OSError as e:
                raise _Bad(f"modules.json: transformer module folder {model_dir.name!r} cannot be "
                           f"listed: {e.strerror or e}") from None
        if not st_pooling:
            st_pooling, st_pooling_note = "mean", "modules.json names no Pooling module; mean pooling assumed"
        if st_pooling_note:
            notes.append(st_pooling_note)
    sub = "" if model_dir == folder else os.path.relpath(model_dir, folder).replace(os.sep, "/") + "/"

    safetensors = sorted(f for f in files if f.endswith(".safetensors"))
    pickles = sorted(f for f in files if f.lower().endswith(_PICKLE_EXT))
    weight_pickles = [f for f in pickles if not _NOT_WEIGHTS.match(f)]
    gguf = sorted(f for f in files if f.lower().endswith(".gguf"))
    onnx = sorted(f for f in files if f.lower().endswith(".onnx"))
    if (model_dir / "onnx").is_dir():
        try:
            onnx += sorted("onnx/" + e.name for e in os.scandir(model_dir / "onnx")
                           if e.name.lower().endswith(".onnx"))
        except OSError:
            pass

    if not safetensors and not weight_pickles:
        if gguf or onnx:
            found = ", ".join((gguf + onnx)[:3])
            raise _Bad(f"GGUF/ONNX not supported (yet): found {found}; Modelium serves "
                       "transformers checkpoints (config.json + *.safetensors)")
        if "model_index.json" in files and "config.json" not in files:
            raise _Bad("model_index.json: diffusers pipelines are not supported")
        if "adapter_config.json" in files and "config.json" not in files:
            raise _Bad("adapter_config.json: LoRA/PEFT adapter folders are not supported yet; "
                       "merge the adapter into its base model")
        others = [f for f in files if f.endswith((".h5", ".msgpack", ".ot"))]
        if others and "config.json" in files:
            raise _Bad(f"only TensorFlow/Flax weights found ({', '.join(others)}); "
                       "Modelium loads *.safetensors")
    if gguf or onnx:
        notes.append(f"{', '.join((gguf + onnx)[:3])} ignored: GGUF/ONNX not supported (yet)")

    if "config.json" not in files:
        raise _Bad(f"{sub}config.json missing: a model folder needs config.json and weights")
    config = _json_object(model_dir / "config.json", f"{sub}config.json")

    # remote code
    remote = []
    if isinstance(config.get("auto_map"), dict) and config["auto_map"]:
        remote.append(("config.json", config["auto_map"]))
    tok_config: dict = {}
    if "tokenizer_config.json" in files:
        tok_config = _json_object(model_dir / "tokenizer_config.json", f"{sub}tokenizer_config.json")
        if isinstance(tok_config.get("auto_map"), (dict, list)) and tok_config["auto_map"]:
            remote.append(("tokenizer_config.json", tok_config["auto_map"]))
    trust_remote_code = False
    if remote:
        where = ", ".join(f"{sub}{f}" for f, _ in remote)
        refs = []
        for _, amap in remote:
            vals = amap.values() if isinstance(amap, dict) else amap
            for v in vals:
                for ref in (v if isinstance(v, list) else [v]):
                    if isinstance(ref, str) and ref not in refs:
                        refs.append(ref)
        shown = ", ".join(refs[:3]) + (" ..." if len(refs) > 3 else "")
        if not options.trust_remote_code:
            raise _Bad(f"{where} has auto_map ({shown}): the model needs custom code from its "
                       "folder, and loading it runs that Python code. Set trust_remote_code: "
                       "true for this model if you trust its source")
        trust_remote_code = True
        notes.append(f"custom code allowed (trust_remote_code): {shown}")

    # weights
    bytes_per_dtype: dict[str, int] = {}
    params_per_dtype: dict[str, int] = {}
    param_count = weight_bytes = 0
    weight_files: list[str] = []
    tensor_names: list[str] = []
    if safetensors:
        if weight_pickles or pickles:
            shown = ", ".join(pickles[:4]) + (" ..." if len(pickles) > 4 else "")
            notes.append(f"{len(pickles)} pickle file(s) ignored because safetensors are present: {shown}")
        counted = _safetensors_weights(model_dir, sub, files, safetensors, notes)
        weight_files, tensor_names = counted.files, counted.names
        for dtype, numel, nbytes in counted.tensors:
            params_per_dtype[dtype] = params_per_dtype.get(dtype, 0) + numel
            bytes_per_dtype[dtype] = bytes_per_dtype.get(dtype, 0) + nbytes
        param_count = sum(params_per_dtype.values())
        weight_bytes = sum(bytes_per_dtype.values())
        if not counted.tensors:
            raise _Bad(f"{', '.join(sub + f for f in weight_files)}: holds no tensors")
    elif weight_pickles:
        shown = ", ".join(sub + f for f in weight_pickles[:4]) + (" ..." if len(weight_pickles) > 4 else "")
        if not options.allow_pickle:
            raise _Bad(f"weights are pickle files only ({shown}): loading pickle can run arbitrary "
                       "code. Convert them to safetensors, or set allow_pickle: true for this "
                       "model if you trust its source")
        weight_files = weight_pickles
        index_name = next((f for f in files if f.endswith(".bin.index.json")), None)
        if index_name:
            index = _json_object(model_dir / index_name, sub + index_name)
            wmap = index.get("weight_map")
            if not isinstance(wmap, dict):
                raise _Bad(f"{sub}{index_name} has no weight_map object")
            shards = sorted({v for v in wmap.values() if isinstance(v, str)})
            missing = [s for s in shards if s not in files]
            if missing:
                raise _Bad(f"{sub}{index_name} names shard {missing[0]!r} which is missing"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            weight_files = shards
        for f in weight_files:
            try:
                weight_bytes += (model_dir / f).stat().st_size
            except OSError as e:
                raise _Bad(f"{sub}{f}: cannot read: {e.strerror or e}") from None
        notes.append("pickle weights allowed (allow_pickle): loading them can run arbitrary code; "
                     "weight_bytes is their file size and param_count is unknown (0), since "
                     "pickle files are not read")
    else:
        raise _Bad(f"no weights: {sub or 'the folder'} has config.json but no *.safetensors file")

    # what the model is
    arch_list = config.get("architectures")
    arch = arch_list[0] if isinstance(arch_list, list) and arch_list and isinstance(arch_list[0], str) else ""
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else ""
    has_chat_template = bool(tok_config.get("chat_template")) or bool(
        {"chat_template.jinja", "chat_template.json"} & files)
    if is_st:
        task, pooling = "embedding", st_pooling
    else:
        task, pooling = _classify(arch, model_type, config, notes)
    if task == "text-generation" and has_chat_template:
        task = "chat"
    decoder = task in ("text-generation", "chat")

    has_tokenizer = bool({"tokenizer.json", "tokenizer.model", "spiece.model",
                          "sentencepiece.bpe.model", "vocab.txt"} & files) or (
        "vocab.json" in files and "merges.txt" in files) or any(f.endswith(".tiktoken") for f in files)
    if not has_tokenizer:
        notes.append("no tokenizer files found (tokenizer.json, tokenizer.model, vocab.txt, or "
                     "vocab.json + merges.txt)")
    token_chars = _max_token_chars(model_dir / "tokenizer.json") if "tokenizer.json" in files else 0

    # context
    max_context = _first_int(config, "max_position_embeddings", "n_positions", "max_seq_len",
                             "seq_length", "max_sequence_length", "n_ctx") or 0
    if is_st:
        for cand in (model_dir / "sentence_bert_config.json", folder / "sentence_bert_config.json"):
            if cand.is_file():
                sbert = _json_object(cand, os.path.relpath(cand, folder))
                if type(sbert.get("max_seq_length")) is int and sbert["max_seq_length"] > 0:
                    max_context = sbert["max_seq_length"]
                break
    if not max_context:
        mml = tok_config.get("model_max_length")
        if type(mml) is int and 0 < mml < 10**7:
            max_context = mml
            notes.append(f"max_context {mml} from tokenizer_config.json model_max_length "
                         "(config.json names no position limit)")

    # dtype and KV cache
    cfg_dtype = config.get("torch_dtype") or config.get("dtype")
    cfg_dtype = cfg_dtype.removeprefix("torch.") if isinstance(cfg_dtype, str) else ""
    dominant = max(params_per_dtype, key=params_per_dtype.get) if params_per_dtype else ""
    if cfg_dtype in _TORCH_DTYPE_BYTES:
        dtype, dtype_bytes, dtype_from = cfg_dtype, _TORCH_DTYPE_BYTES[cfg_dtype], f"config.json {'torch_dtype' if config.get('torch_dtype') else 'dtype'}"
        if dominant in _FLOAT_DTYPES and _FLOAT_DTYPES[dominant] != cfg_dtype:
            notes.append(f"config.json says {cfg_dtype} but most weights are stored as {dominant}")
    elif dominant in _FLOAT_DTYPES:
        dtype, dtype_bytes, dtype_from = _FLOAT_DTYPES[dominant], DTYPE_BITS[dominant] // 8, "the dominant weight dtype"
    else:
        dtype, dtype_bytes, dtype_from = "", 2, "a 16-bit default (no float dtype in config or weights)"
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        notes.append(f"quantized ({quant.get('quant_method', 'unknown method')}): param_count "
                     "counts stored (packed) elements")

    if tensor_names:
        _check_config_against_weights(config, model_type, params_per_dtype, tensor_names, notes)

    kv_per_token = _kv_bytes_per_token(config, model_type, dtype_bytes, notes) if decoder else 0

    if options.concurrency < 1:
        raise _Bad(f"concurrency must be at least 1, not {options.concurrency}")
    if decoder:
        if options.context_tokens is not None:
            context = max(0, int(options.context_tokens))
            if max_context and context > max_context:
                notes.append(f"context_tokens {context} capped at the model's max_context {max_context}")
                context = max_context
        else:
            context = min(max_context, DEFAULT_CONTEXT) if max_context else DEFAULT_CONTEXT
        concurrency = options.concurrency
    else:
        context, concurrency = 0, options.concurrency
    if options.runtime_overhead_bytes < 0:
        raise _Bad(f"runtime_overhead_bytes must be >= 0, not {options.runtime_overhead_bytes}")
    if decoder and kv_per_token:
        notes.append(f"KV cache sized for {context} tokens x {concurrency} sequence(s); "
                     f"KV dtype {dtype or '16-bit'} ({dtype_bytes} B) from {dtype_from}")
    elif not decoder:
        notes.append(f"no KV cache: {task} is not a decoder LLM")

    # backend
    backend = "transformers"
    if decoder:
        if options.vllm_available and options.gpu_present and arch in VLLM_ARCHITECTURES:
            backend = "vllm"
        elif not options.gpu_present:
            notes.append("backend transformers: no GPU (vLLM needs one)")
        elif not options.vllm_available:
            notes.append("backend transformers: vLLM is not installed")
        else:
            notes.append(f"backend transformers: {arch or 'this architecture'} is not on the vLLM list")
    if "backend" in own:  # the folder's own choice wins
        backend = own["backend"]
        if backend == "vllm" and task not in VLLM_TASKS:
            raise _Bad(f"{MODEL_SETTINGS_FILE}: backend vllm serves {', '.join(VLLM_TASKS)}, not {task}")
        notes[:] = [n for n in notes if not n.startswith("backend ")]
        notes.append(f"backend {backend}: chosen by {MODEL_SETTINGS_FILE}")

    license, tags = _front_matter(folder, notes) if "README.md" in top else ("", [])
    return ModelSpec(
        name=name, path=path, fingerprint=fp, architecture=arch, model_type=model_type,
        task=task, family=model_type, param_count=param_count, weight_bytes=weight_bytes,
        bytes_per_dtype=dict(sorted(bytes_per_dtype.items())),
        params_per_dtype=dict(sorted(params_per_dtype.items())),
        weight_files=[sub + f for f in weight_files], has_tokenizer=has_tokenizer,
        has_chat_template=has_chat_template, max_context=max_context,
        kv_bytes_per_token=kv_per_token, pooling=pooling, backend=backend,
        context_tokens=context if kv_per_token else 0, concurrency=concurrency,
        runtime_overhead_bytes=options.runtime_overhead_bytes,
        license=license, tags=tags, notes=notes, dtype=dtype,
        trust_remote_code=trust_remote_code, max_token_chars=token_chars, normalize=normalize,
        subfolder=sub.rstrip("/"),
    )


def _model_settings(folder: Path) -> dict[str, Any]:
    """The folder's ``modelium.yaml``: a mapping of the model's own settings. Only ``backend``
    (one of :data:`KNOWN_BACKENDS`) is known so far; anything else is refused with the reason."""
    label = MODEL_SETTINGS_FILE
    path = folder / label
    try:
        if path.stat().st_size > MODEL_SETTINGS_LIMIT:
            raise _Bad(f"{label} is over the {MODEL_SETTINGS_LIMIT} byte limit")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise _Bad(f"{label}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise _Bad(f"{label} is not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _Bad(f"{label} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _Bad(f"{label} must hold a mapping of settings (backend: ...), not a {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k != "backend")
    if unknown:
        raise _Bad(f"{label}: unknown setting(s) {', '.join(map(repr, unknown))} (known: backend)")
    if "backend" in data and data["backend"] not in KNOWN_BACKENDS:
        raise _Bad(f"{label}: unknown backend {data['backend']!r} (known: {', '.join(KNOWN_BACKENDS)})")
    return dict(data)


def _max_token_chars(path: Path) -> int:
    """Characters of the longest vocabulary entry or added token in ``tokenizer.json`` (0 when
    unreadable: it is a bound for refusing oversized prompts early, never a reason to refuse a
    model). No token covers more characters of text than its own entry has."""
    try:
        data = json.loads(path.read_bytes())
        model = data.get("model") or {}
        vocab = model.get("vocab") or {}
        entries = vocab.keys() if isinstance(vocab, dict) else (v[0] for v in vocab if isinstance(v, list) and v)
        best = max((len(t) for t in entries if isinstance(t, str)), default=0)
        added = (t.get("content", "") for t in data.get("added_tokens") or [] if isinstance(t, dict))
        return max(best, max((len(c) for c in added if isinstance(c, str)), default=0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


class _Counted(NamedTuple):
    files: list[str]
    tensors: list[tuple[str, int, int]]  # (dtype, numel, nbytes) of each tensor counted once
    names: list[str]  # the tensors' names, in the same order


def _safetensors_weights(model_dir: Path, sub: str, files: set[str], safetensors: list[str],
                         notes: list[str]) -> _Counted:
    indexes = sorted(f for f in files if f.endswith(".safetensors.index.json"))
    if indexes:
        index_name = "model.safetensors.index.json" if "model.safetensors.index.json" in indexes else indexes[0]
        if len(indexes) > 1:
            notes.append(f"several safetensors indexes; used {index_name}")
        label = sub + index_name
        index = _json_object(model_dir / index_name, label)
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise _Bad(f"{label} has no weight_map object (tensor name -> shard file)")
        by_shard: dict[str, list[str]] = {}
        for tensor, shard in wmap.items():
            if not isinstance(shard, str):
                raise _Bad(f"{label}: tensor {tensor!r} maps to {shard!r}, not a file name")
            by_shard.setdefault(shard, []).append(tensor)
        shards = sorted(by_shard)
        for s in shards:
            if "/" in s or "\\" in s or s.startswith(".") or not s.endswith(".safetensors"):
                raise _Bad(f"{label} names shard {s!r}: shards must be *.safetensors files in "
                           "the model folder")
        missing = [s for s in shards if s not in files]
        if missing:
            more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})" if len(missing) > 1 else ""
            raise _Bad(f"{label} names shard {missing[0]!r} (for {len(by_shard[missing[0]])} "
                       f"tensors, e.g. {by_shard[missing[0]][0]!r}) but that file is missing{more}")
        counted: list[tuple[str, int, int]] = []
        names: list[str] = []
        seen: dict[str, str] = {}
        extra = dups = 0
        for s in shards:
            header = read_safetensors_header(model_dir / s, sub + s)
            for tensor in by_shard[s]:
                if tensor not in header:
                    raise _Bad(f"{label} maps tensor {tensor!r} to {s!r} but {s} has no such tensor")
            for tensor, info in header.items():
                if tensor in seen:
                    dups += 1
                    continue
                if wmap.get(tensor, s) != s:
                    dups += 1  # counted from the shard the index names
                    continue
                if tensor not in wmap:
                    extra += 1
                seen[tensor] = s
                counted.append(info)
                names.append(tensor)
        if extra:
            notes.append(f"{extra} tensor(s) in the shards are not in {index_name}'s weight_map "
                         "(counted)")
        if dups:
            notes.append(f"{dups} duplicate tensor name(s) across shards counted once")
        unused = [f for f in safetensors if f not in by_shard]
        if unused:
            notes.append(f"{', '.join(unused[:3])} ignored: not named by {index_name}")
        return _Counted(shards, counted, names)

    shard_like = [f for f in safetensors if _SHARD_NAME.search(f)]
    if "model.safetensors" in safetensors:
        used = ["model.safetensors"]
    elif shard_like:
        raise _Bad(f"found sharded safetensors ({', '.join(shard_like[:3])}) but no "
                   "model.safetensors.index.json to say which tensor is in which shard")
    else:
        used = safetensors
    unused = [f for f in safetensors if f not in used]
    if unused:
        notes.append(f"{', '.join(unused[:3])} ignored: model.safetensors is the checkpoint")
    counted = []
    names = []
    seen_names: set[str] = set()
    for f in used:
        for tensor, info in read_safetensors_header(model_dir / f, sub + f).items():
            if tensor not in seen_names:
                seen_names.add(tensor)
                counted.append(info)
                names.append(tensor)
    return _Counted(used, counted, names)
