"""Small builders shared by the pure tests (no event loop)."""

from modelium.core.messages import (
    DeviceRegistered,
    LoadCompleted,
    LoadStarted,
    ModelDiscovered,
    ModelSpec,
    RequestArrived,
    RequestFinished,
)

MiB = 2**20


def spec(name: str, mib: int = 100, task: str = "text-generation") -> ModelSpec:
    return ModelSpec(
        name=name, path=f"/models/{name}", fingerprint=f"fp-{name}", architecture="LlamaForCausalLM",
        model_type="llama", task=task, weight_bytes=mib * MiB,  # its estimate: exactly its weights
    )


def published(log, t):
    """The events of type ``t`` a running log published (as far as its memory holds them)."""
    return log.published(t)


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


class Result:
    """What a request's frames add up to (the terminal frame, per-choice text and finish)."""

    def __init__(self, frames):
        from modelium.core.messages import Done, Encoded, Failed, Token

        self.frames = frames
        self.terminal = frames[-1] if frames else None
        self.error = self.terminal if isinstance(self.terminal, Failed) else None
        self.texts: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        for f in frames:
            if isinstance(f, Token):
                self.texts[f.index] = self.texts.get(f.index, "") + f.text
                if f.finish:
                    self.finish[f.index] = f.finish
        done = self.terminal if isinstance(self.terminal, (Done, Encoded)) else None
        self.prompt_tokens = done.prompt_tokens if done else 0
        self.completion_tokens = getattr(done, "completion_tokens", 0) if done else 0
        self.text = self.texts.get(0, "")

    def as_tuple(self):
        """(text, prompt tokens, completion tokens, finish reason) of choice 0."""
        return self.text, self.prompt_tokens, self.completion_tokens, self.finish.get(0)

    def __repr__(self):
        return f"Result({self.as_tuple()!r}, error={self.error!r})"


async def collect(recv):
    return [f async for f in recv]


async def run_on(worker, request):
    """Run ``request`` on a backend worker and gather its frames."""
    import trio

    send, recv = trio.open_memory_channel(float("inf"))
    job = worker.submit(request, send)
    frames = await collect(recv)
    await job.outcome()
    return Result(frames)


async def ask(router, model, request, *, rid, kind="completion", timeout=120.0):
    """Submit ``request`` to a running router and gather its frames (a refusal raises Refused)."""
    import trio

    from modelium.core.messages import Submit

    send, recv = trio.open_memory_channel(float("inf"))
    await router.ask(Submit(model=model, request_id=rid, kind=kind, request=request, timeout_s=timeout, sink=send))
    return Result(await collect(recv))
