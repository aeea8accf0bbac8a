"""Small builders shared by the pure tests (no event loop)."""

from modelium.messages import (
    DeviceRegistered,
    LoadCompleted,
    LoadStarted,
    MemoryEstimate,
    ModelDiscovered,
    ModelSpec,
    RequestArrived,
    RequestFinished,
)

MiB = 2**20


def spec(name: str, mib: int = 100, task: str = "text-generation") -> ModelSpec:
    return ModelSpec(
        name=name, path=f"/models/{name}", fingerprint=f"fp-{name}", architecture="LlamaForCausalLM",
        model_type="llama", task=task, weight_bytes=mib * MiB,
        estimate=MemoryEstimate(weights=mib * MiB, overhead=0, total=mib * MiB),
    )


def published(log, t):
    """The events of type ``t`` a running log published (read from its in-memory ring)."""
    ring, n = log._ring, log._ring_size
    return [ring[s % n][1] for s in range(log.first_seq_this_run, log.last_seq + 1) if isinstance(ring[s % n][1], t)]


class Script:
    """Builds a log as a list of (seq, event) with increasing ts."""

    def __init__(self, t0: float = 1000.0):
        self.events = []
        self.t = t0

    def add(self, event, dt: float = 1.0):
        import msgspec

        self.t += dt
        event = msgspec.structs.replace(event, ts=self.t)
        self.events.append((len(self.events) + 1, event))
        return len(self.events)

    def device(self, name="cpu", mib=250, kind="cpu"):
        return self.add(DeviceRegistered(device=name, kind=kind, total_bytes=mib * 4 * MiB, budget_bytes=mib * MiB))

    def model(self, name, mib=100, task="text-generation"):
        return self.add(ModelDiscovered(model=name, spec=spec(name, mib, task)))

    def loaded(self, name, device="cpu"):
        self.add(LoadStarted(model=name, device=device))
        return self.add(LoadCompleted(model=name, device=device, load_s=1.0, pid=4242))

    def arrive(self, name, rid):
        return self.add(RequestArrived(model=name, request_id=rid))

    def finish(self, name, rid, status="ok"):
        return self.add(RequestFinished(model=name, request_id=rid, status=status, completion_tokens=3))
