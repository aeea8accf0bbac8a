"""Cold start benchmark: from a request for a model that is not loaded to its first token.

  python bench/coldstart.py                                # a ~400 MB bf16 Llama on the CPU
  python bench/coldstart.py --device cuda:0 --size 1.1b    # a 1.1B-parameter bf16 Llama on a GPU

One generated model (random weights, real shapes, written to a temporary folder), in one run:
* cold: spawn a worker process (imports torch + transformers), load, first token;
* spare + safetensors: a warm spare kept for the device, the direct loader, first token;
* spare + fastsafetensors: the same with fastsafetensors (when it is installed);
* spare + from_pretrained: the same with transformers' from_pretrained;
* floor: in this (already warm) process, read every tensor of the same safetensors onto the
  same device with safe_open (what no loader can beat).
Each row is the median of ``--rounds``; ratios are against the floor of the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelium.backends import fastload  # noqa: E402
from modelium.backends.hf import HFBackend  # noqa: E402
from modelium.core.analysis import analyse  # noqa: E402
from modelium.core.messages import Generation  # noqa: E402
from modelium.demo import write_tiny_model  # noqa: E402
from modelium.hardware import DeviceInfo  # noqa: E402

SIZES = {
    # hidden, layers, intermediate, heads, kv heads, vocab
    "small": dict(hidden=1024, layers=12, intermediate=2816, heads=16, kv_heads=4, vocab=32000),
    "1.1b": dict(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
}


def write_random_llama(folder: str | Path, *, hidden: int, layers: int, intermediate: int, heads: int,
                       kv_heads: int, vocab: int, dtype: str = "bfloat16", context: int = 2048,
                       shards: int = 1, seed: int = 0) -> Path:
    """A Llama of the given shape with random weights (norms at one) in ``folder``, with the tiny
    models' trained tokenizer (ids beyond its vocabulary are never produced by it)."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    folder = Path(folder)
    write_tiny_model(folder, "llama", seed=seed)  # tokenizer and generation config; weights replaced
    old = json.loads((folder / "config.json").read_text())
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    config = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        bos_token_id=old["bos_token_id"], eos_token_id=old["eos_token_id"], pad_token_id=old["pad_token_id"],
        tie_word_embeddings=False, dtype=dtype, architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in tf.LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    names = list(shapes)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = {}
        for name in names[i * per:(i + 1) * per]:
            t = torch.empty(shapes[name], dtype=torch.float32)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            part[name] = t.to(getattr(torch, dtype))
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map |= {name: fname for name in part}
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return folder


def floor_s(path: Path, device: str, touch: bool = False) -> float:
    """Seconds to read every tensor of ``path``'s safetensors onto ``device`` in this process. On
    the CPU safe_open maps the file: ``touch`` also reads every byte (a copy of each tensor)."""
    import torch
    from safetensors import safe_open

    t0 = time.perf_counter()
    held = []
    for f in fastload.checkpoint_files(path):
        with safe_open(str(f), framework="pt", device=device) as st:
            held += [st.get_tensor(k) for k in st.keys()]
    if touch:
        held = [t.clone() for t in held]
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    took = time.perf_counter() - t0
    del held
    return took


def device_info(device: str) -> DeviceInfo:
    if device == "cpu":
        return DeviceInfo("cpu", "cpu", "CPU", 0, 0)
    index = int(device.partition(":")[2] or 0)
    return DeviceInfo(f"gpu:{index}", "gpu", "GPU", 0, 0, index=index)


async def first_token(worker, t0: float) -> float:
    """Seconds from ``t0`` to the first token of a greedy completion (the rest is drained)."""
    send, recv = trio.open_memory_channel(float("inf"))
    job = worker.submit(Generation(prompt="Once upon a time", max_tokens=4, temperature=0), send)
    first = None
    async for _ in recv:
        if first is None:
            first = time.perf_counter() - t0
    await job.outcome()
    return first if first is not None else time.perf_counter() - t0


async def one(backend: HFBackend, spec, dev: DeviceInfo, mode: str, loader: str) -> dict:
    if mode == "cold":
        backend.set_spares(0)  # no refill racing the cold spawn
        await trio.sleep(0.5)
    else:
        backend.set_spares(1)
        await backend.wait_ready(1, dev.torch_device)
    t0 = time.perf_counter()
    worker = await (backend.spawn() if mode == "cold" else backend.acquire(dev.torch_device))
    t1 = time.perf_counter()
    msg = msgspec.structs.replace(backend.load_message(spec, dev), loader=loader)
    loaded = await worker.load(msg)
    first = await first_token(worker, t0)
    loaded_first = await first_token(worker, time.perf_counter())  # the same request, the model loaded
    await worker.stop()
    return dict(total=first, worker=t1 - t0, build=loaded.build_s, weights=loaded.weights_s,
                warmup=loaded.warmup_s, loader=loaded.loader, loaded=loaded_first)


async def measure(path: Path, device: str, rounds: int) -> None:
    import torch  # noqa: F401 - the floor is measured in a warm process

    floor_s(path, device)  # warm: page cache, safetensors, the device's context
    floor = statistics.median(floor_s(path, device) for _ in range(rounds))
    touched = statistics.median(floor_s(path, device, touch=True) for _ in range(rounds)) if device == "cpu" else 0
    dev = device_info(device)
    spec = analyse(path)  # the server's analysis happens when the folder is found, not at the request
    rows = [("cold worker + safetensors", "cold", "safetensors"),
            ("warm spare + safetensors", "spare", "safetensors")]
    if fastload.fastsafetensors_available():
        rows.append(("warm spare + fastsafetensors", "spare", "fastsafetensors"))
    rows.append(("warm spare + from_pretrained", "spare", "from_pretrained"))
    results: dict[str, list[dict]] = {label: [] for label, _, _ in rows}
    backend = HFBackend(spares=0, devices=[device])
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        for _ in range(rounds):
            for label, mode, loader in rows:
                results[label].append(await one(backend, spec, dev, mode, loader))
        nursery.cancel_scope.cancel()
    print(f"{'request -> first token':<30} {'total':>8} {'x floor':>8} {'worker':>8} {'build':>8} "
          f"{'weights':>8} {'warm-up':>8}  loader")
    for label, _, _ in rows:
        r = results[label]
        med = {k: statistics.median(x[k] for x in r) for k in ("total", "worker", "build", "weights", "warmup")}
        print(f"{label:<30} {med['total']:7.3f}s {med['total'] / floor:7.1f}x {med['worker']:7.3f}s "
              f"{med['build']:7.3f}s {med['weights']:7.3f}s {med['warmup']:7.3f}s  {r[-1]['loader']}")
    print(f"{'floor: safe_open every tensor':<30} {floor:7.3f}s {1.0:7.1f}x  (in a warm process, onto {device})")
    if touched:
        print(f"{'  ... and read every byte':<30} {touched:7.3f}s {touched / floor:7.1f}x  (safe_open maps the file "
              f"on the CPU: its pages are read when first used)")
    loaded = statistics.median(x["loaded"] for r in results.values() for x in r)
    print(f"{'the model already loaded':<30} {loaded:7.3f}s {loaded / floor:7.1f}x  (the same request: its own "
          f"compute, the floor of request -> first token)")
    if not fastload.fastsafetensors_available():
        print("fastsafetensors: not installed (the default loader is safetensors' safe_open)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--layers", type=int, help="override the size's layer count")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    shape = dict(SIZES[a.size])
    if a.layers:
        shape["layers"] = a.layers
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_random_llama(Path(tmp) / "model", shards=a.shards, **shape)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        params = size // 2
        print(f"model: Llama {shape} bf16, {params / 1e9:.2f}B parameters, {size / 2**20:.0f} MiB in {a.shards} "
              f"file(s) (written in {time.perf_counter() - t0:.1f}s); device {a.device}; median of {a.rounds}")
        trio.run(measure, path, a.device, a.rounds)


if __name__ == "__main__":
    main()
