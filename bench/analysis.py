"""Benchmark of model discovery and analysis (modelium.core.analysis).

    python bench/analysis.py [--folders 1000] [--shards 8] [--tensors 2000] [--runs 7]

Prints labelled figures:
* rescan: ``scan_root`` (stats + fingerprints) over N unchanged model folders, median of runs;
* diff of two N-entry fingerprint maps;
* full ``analyse`` of every one of the N folders (a cold start's first scan);
* ``analyse`` of a sharded checkpoint (S shards x T tensors each), written sparsely (header,
  then truncate to the size the header describes), so only headers are ever on disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelium.core.analysis import AnalysisOptions, analyse, diff, scan_root  # noqa: E402
from modelium.core.memory import estimate  # noqa: E402
from modelium.core.messages import ModelSpec  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 2048, "torch_dtype": "bfloat16",
}


def write_safetensors(path: Path, tensors: list[tuple[str, str, list[int]]], *, sparse: bool) -> int:
    """Write a header for ``tensors`` (name, dtype, shape) and the data section: zeros when
    small, a sparse hole (truncate) when ``sparse``. Returns the file size."""
    size = {"BF16": 2, "F16": 2, "F32": 4}
    header, pos = {}, 0
    for name, dtype, shape in tensors:
        n = size[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if sparse:
            f.truncate(8 + len(raw) + pos)
        else:
            f.write(b"\0" * pos)
    return 8 + len(raw) + pos


def make_folders(root: Path, count: int) -> None:
    tensors = [("embed", "BF16", [16, 8]), ("norm", "BF16", [8]), ("lm_head", "BF16", [16, 8])]
    for i in range(count):
        d = root / f"model-{i:04d}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(CONFIG))
        (d / "tokenizer.json").write_text("{}")
        (d / "tokenizer_config.json").write_text("{}")
        write_safetensors(d / "model.safetensors", tensors, sparse=False)


def make_sharded(folder: Path, shards: int, per_shard: int) -> tuple[int, int]:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        CONFIG | {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                  "num_key_value_heads": 8, "max_position_embeddings": 8192}))
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = [(f"model.layers.{s}.block.{t}.weight", "BF16", [8192, 1024])
                   for t in range(per_shard)]
        total += write_safetensors(folder / fname, tensors, sparse=True)
        weight_map.update({name: fname for name, _, _ in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return len(weight_map), total


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folders", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--tensors", type=int, default=2000, help="tensors per shard")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="modelium-bench-") as tmp:
        root = Path(tmp) / "models"
        root.mkdir()
        t = time.perf_counter()
        make_folders(root, args.folders)
        print(f"setup: {args.folders} model folders written in {time.perf_counter() - t:.2f} s")

        scan_root(root)  # warm the page/dentry cache: the watcher rescans a warm folder
        med, states = timed(lambda: scan_root(root), args.runs)
        assert len(states) == args.folders
        print(f"scan_root (stats + fingerprints), {args.folders} unchanged folders: "
              f"median {med * 1e3:.1f} ms over {args.runs} runs "
              f"({med / args.folders * 1e6:.1f} us/folder)")

        fps = {n: s.fingerprint for n, s in states.items()}
        med, result = timed(lambda: diff(fps, dict(fps)), args.runs)
        assert result == ([], [], [])
        print(f"diff of two {args.folders}-entry fingerprint maps: median {med * 1e3:.2f} ms")

        t = time.perf_counter()
        specs = [analyse(Path(s.path), root=root) for s in states.values()]
        dt = time.perf_counter() - t
        assert all(isinstance(s, ModelSpec) for s in specs), specs[0]
        print(f"analyse every folder (cold start), {args.folders} folders: {dt * 1e3:.0f} ms "
              f"({dt / args.folders * 1e3:.2f} ms/folder)")

        big = Path(tmp) / "sharded"
        t = time.perf_counter()
        n_tensors, n_bytes = make_sharded(big, args.shards, args.tensors)
        print(f"setup: sharded checkpoint {args.shards} shards x {args.tensors} tensors "
              f"({n_tensors} tensors, {n_bytes / 2**30:.1f} GiB sparse) written in "
              f"{time.perf_counter() - t:.2f} s")
        opts = AnalysisOptions(gpu_present=True, vllm_available=True)
        med, spec = timed(lambda: analyse(big, root=Path(tmp), options=opts), args.runs)
        assert isinstance(spec, ModelSpec), spec
        print(f"analyse sharded checkpoint headers: median {med * 1e3:.1f} ms over {args.runs} runs "
              f"({med / n_tensors * 1e6:.2f} us/tensor)")
        print(f"  -> param_count {spec.param_count:,}, weight_bytes {spec.weight_bytes / 2**30:.1f} GiB, "
              f"kv {spec.kv_bytes_per_token:,} B/token, backend {spec.backend}")
        print(f"  -> estimate: {estimate(spec).notes}")


if __name__ == "__main__":
    main()
