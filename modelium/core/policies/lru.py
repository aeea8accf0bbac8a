"""``lru``: load on demand, evict the least recently used idle model when memory is
short, unload models idle for longer than the keep-alive.

On every trigger it reconciles the whole view, in this order:

1. resident models whose folder vanished or whose files changed are evicted once idle;
2. on a ``Tick``, ready models idle for ``keep_alive_s`` or more are evicted (or for the
   ``keep_alive`` their last request asked for, Ollama's parameter; negative: never);
3. every model with waiting requests that is not resident is placed: on the device where it fits
   best (the least free memory left, GPUs first); else on the device where evicting
   least-recently-used idle models makes room (the best worst victim);
   requests for a model that can fit nowhere, was removed, became invalid, failed to load less
   than ``retry_failed_s`` ago, or whose worker crashed ``max_crashes`` times (the last less than
   ``retry_failed_s`` ago) are rejected with the reason. When memory is held by busy or loading
   models the requests simply keep waiting: a later trigger (a request finishing) places them.

Devices are tried GPUs first, then by name; models by the arrival of their oldest waiting request.

Pinned models (``Pinned`` events, an administrator's) are ``protected``: never victims, never
unloaded for idleness; on a ``Tick`` one that is not loaded is loaded where it fits in free memory
(nothing is evicted for it); a waiting model that fits on no device beside the pinned ones is
rejected with that reason.

Parking (when the server has host memory for it, ``park_host_bytes``): a victim on a GPU whose
worker can park (``parkable``) is parked instead of evicted when the host's ledger has room for
its weights (``Park``: the weights go to host memory, the worker stays); otherwise it is evicted.
A parked model with waiting requests
is woken on its device (``Wake``: victims there are parked or evicted for it as for a load); one
whose device is unavailable, or that no longer fits there, is evicted and loads again where it
fits. Parked models are victims only after idle ready ones (they hold only their runtime), and are
evicted once idle past their keep-alive. A model on the CPU is never parked (it would free nothing).
"""

from __future__ import annotations

import math
from typing import Any

from modelium.core.errors import ErrorKind
from modelium.hardware import format_bytes
from modelium.core.messages import Event, Tick
from modelium.core.policies.base import (
    GPU_ONLY_BACKENDS,
    ClusterView,
    Decision,
    Evict,
    Load,
    ModelView,
    Park,
    Reject,
    Wake,
    needs,
    needs_note,
    runs_on,
    wake_more,
    wake_of,
)


_NOT_RESIDENT = ("discovered", "unloaded", "failed", "invalid")
_WANTS = _NOT_RESIDENT + ("parked",)  # states in which waiting requests need a decision (a load or a wake)
_PLACED = ("loading", "ready", "parking", "parked")  # holds memory a new placement cannot use (parking, parked: the runtime)
LOADABLE = ("discovered", "unloaded")  # may be loaded without a request (pinned, pre-loaded)


def json_number(x: float) -> float | str:
    """A setting as JSON can hold it (and ``float()`` reads back): infinity as ``"inf"``."""
    return "inf" if math.isinf(x) else x


def requested_keep_alive(m: ModelView) -> tuple[float, str] | None:
    """The keep-alive ``m``'s last request asked for, with the reason; None when it asked none."""
    if m.keep_alive_s is None:
        return None
    ka = math.inf if m.keep_alive_s < 0 else m.keep_alive_s
    return ka, f"its last request's keep_alive {ka:g} s"


class LRUPolicy:
    name = "lru"

    def __init__(self, keep_alive_s: float = 300.0, retry_failed_s: float = 30.0, max_crashes: int = 3):
        keep_alive_s = float(keep_alive_s)  # "inf": never unload for idleness
        if keep_alive_s < 0 or retry_failed_s < 0 or max_crashes < 1:
            raise ValueError("keep_alive_s and retry_failed_s must be >= 0, max_crashes >= 1")
        self.keep_alive_s = keep_alive_s
        self.retry_failed_s = float(retry_failed_s)
        self.max_crashes = int(max_crashes)

    @property
    def settings(self) -> dict[str, Any]:
        return {"keep_alive_s": json_number(self.keep_alive_s), "retry_failed_s": self.retry_failed_s,
                "max_crashes": self.max_crashes}

    def victim_key(self, m: ModelView, now: float) -> tuple:
        """Idle models are evicted in this order (smallest first): least recently used."""
        return (m.last_used, m.used_seq, m.name)

    def victim_reason(self, m: ModelView, now: float, device: str) -> str:
        return f"least recently used idle model on {device} (idle {now - m.last_used:.0f} s)"

    # hooks for the policies built on this one (each is documented where it is overridden)

    busy_victims = False  # may a busy model be evicted (it drains first) when no idle one makes room?
    parks = True  # may a victim be parked instead of evicted (where the server has host memory for it)?

    def park_plan(self, x: ModelView, device: Any, host: list[int]) -> tuple[int, int] | None:
        """``(host_bytes, keep_bytes)`` when victim ``x`` on ``device`` may be parked, with
        ``host`` = [the host ledger's free bytes]; None: it is evicted. Pure."""
        if not (self.parks and host and x.parkable and x.state == "ready" and device.kind == "gpu" and x.spec):
            return None
        weights = x.spec.weight_bytes or x.bytes
        if weights > host[0]:
            return None
        return weights, min(x.bytes, x.spec.runtime_overhead_bytes)

    def keep_alive(self, m: ModelView, now: float) -> tuple[float, str]:
        """How long ``m`` may stay idle before a Tick unloads it, and why that long: what its last
        request asked for (``keep_alive``; negative: for ever), else the policy's own."""
        if (asked := requested_keep_alive(m)) is not None:
            return asked
        return self.keep_alive_s, f"keep-alive {self.keep_alive_s:g} s"

    def protected(self, m: ModelView) -> bool:
        """A model that is never chosen as a victim, nor unloaded for idleness (a pinned model)."""
        return m.pinned

    def max_models(self, device: Any) -> int | None:
        """At most this many models placed on ``device`` at once (None: as many as fit)."""
        return None

    def on_tick(self, view: ClusterView, now: float, used: dict[str, int], leaving: set[str],
                devices: list, idle: dict[str, list[ModelView]], out: list[Decision]) -> None:
        """Extra decisions a policy takes on a Tick, after placing waiting requests."""

    def load_into_free(self, view: ClusterView, wanted: list[tuple[str, ModelView]], used: dict[str, int],
                       devices: list, out: list[Decision]) -> None:
        """Load each ``(why, model)`` of ``wanted`` that is not loaded, on the first device where it
        fits in free memory (nothing is evicted for it); a model already loading in ``out`` is skipped."""
        loading = {d.model for d in out if isinstance(d, (Load, Wake))}
        limits = {d.name: self.max_models(d) for d in devices}
        placed: dict[str, int] = {}
        if any(v is not None for v in limits.values()):
            for x in view.models.values():
                if x.device is not None and x.state in _PLACED:
                    placed[x.device] = placed.get(x.device, 0) + 1
        for why, m in wanted:
            if m.state == "parked" and m.name not in loading and m.spec is not None and not m.removed:
                d = view.devices.get(m.device)
                more = wake_more(m)
                if d is not None and not d.unavailable and more <= d.budget_bytes - used[d.name]:
                    out.append(wake_of(m, d.name, why, f"{format_bytes(d.budget_bytes - used[d.name])} free"))
                    used[d.name] += more
                    loading.add(m.name)
                continue
            if m.name in loading or m.state not in LOADABLE or m.spec is None or m.removed:
                continue
            need = needs(m)
            for d in devices:
                if not runs_on(m, d):
                    continue
                free = d.budget_bytes - used[d.name]
                if limits[d.name] is not None and placed.get(d.name, 0) >= limits[d.name]:
                    continue
                if need <= free:
                    out.append(Load(model=m.name, device=d.name, bytes=need, reason=(
                        f"{why}; needs {format_bytes(need)}{needs_note(m)}, {format_bytes(free)} free on {d.name}")))
                    used[d.name] += need
                    placed[d.name] = placed.get(d.name, 0) + 1
                    loading.add(m.name)
                    break

    def begin(self, view: ClusterView, now: float) -> None:
        """Called at the start of every decision, before any victim is ordered."""

    def decide(self, view: ClusterView, trigger: Event) -> list[Decision]:
        now = trigger.ts
        self.begin(view, now)
        out: list[Decision] = []
        models = view.models
        # the brain asks on every event: this reads the fold's indexes (models asked for, models
        # flagged) and sorts only what it acts on; a Tick alone looks at every model
        waits = {}
        for name in view.asked:
            m = models[name]
            if m.state in _WANTS and (w := m.waiting):
                waits[name] = w
        tick = type(trigger) is Tick
        lost = {d.name: d.unavailable for d in view.devices.values() if d.unavailable}
        if not waits and not view.flagged and not tick and not lost:
            return out
        leaving: set[str] = set()

        def evict(m: ModelView, reason: str) -> None:
            out.append(Evict(model=m.name, reason=reason))
            leaving.add(m.name)

        if lost:  # what runs on an unavailable device is evicted, busy or not, to load elsewhere
            for name in sorted(models):
                m = models[name]
                if m.state in ("ready", "parked") and m.device in lost:
                    evict(m, f"device {m.device} is unavailable ({lost[m.device]}); "
                             "it loads again elsewhere when asked for")

        for name in sorted(view.flagged):
            m = models[name]
            if m.state in ("ready", "parked") and not m.pending:
                evict(m, "model folder removed" if m.removed
                      else "model files changed; the new version loads on the next request")

        if tick:
            for name in sorted(models):
                m = models[name]
                if m.state in ("ready", "parked") and not m.pending and name not in leaving and not self.protected(m):
                    idle = now - m.last_used
                    limit, why = self.keep_alive(m, now)
                    if idle >= limit:
                        evict(m, f"idle for {idle:.0f} s ({why})" + (" while parked" if m.state == "parked" else ""))

        if not waits and not tick:
            return out
        wanting = sorted((view.models[name] for name in waits), key=lambda m: (waits[m.name][0], m.name))
        busy_victims = self.busy_victims
        # one pass over the models: memory placed per device (loading or ready, as
        # ``view.used_bytes``), and each device's idle ready models (to be put in victim order)
        used = dict.fromkeys(view.devices, 0)
        idle: dict[str, list[ModelView]] = {}
        held = dict.fromkeys(view.devices, 0)  # memory held by pinned models, per device
        for x in models.values():
            if x.device is not None and x.state in _PLACED:
                if x.device in used and x.name not in leaving:
                    used[x.device] += x.bytes
                    if x.pinned:
                        held[x.device] += x.bytes
                if (x.state == "ready" and (busy_victims or not x.pending) or x.state == "parked" and not x.pending) \
                        and not self.protected(x) and x.name not in leaving:
                    idle.setdefault(x.device, []).append(x)
        host_entry = next((d for d in view.devices.values() if d.kind == "host"), None)
        # the host's ledger for parked weights: [free bytes] (empty: this server does not park)
        host: list[int] = []
        if host_entry is not None and self.parks:
            # parked weights (and those parking, or waking until Woken) hold host memory
            host.append(host_entry.budget_bytes - sum(x.host_bytes for x in models.values()
                                                      if x.host_bytes and x.name not in leaving))
        devices = sorted((d for d in view.devices.values() if not d.unavailable and d.kind != "host"),
                         key=lambda d: (d.kind != "gpu", d.name))
        for victims in idle.values():  # idle ones first (busy ones, where allowed, drain first), parked ones last
            victims.sort(key=lambda x: (bool(x.pending), x.state == "parked", self.victim_key(x, now)))

        def reach() -> int:
            """The most memory any device could offer now: its free bytes and its idle models'."""
            return max(d.budget_bytes - used[d.name] + sum(x.bytes for x in idle.get(d.name, ()) if x.name not in leaving)
                       for d in devices) if devices else -1

        biggest = max((d.budget_bytes for d in devices), default=0)
        has_gpu = any(d.kind == "gpu" for d in devices)
        spare = reach()
        for m in wanting:
            n = len(waits[m.name])
            if m.removed:
                out.append(Reject(model=m.name, reason=f"model {m.name} was removed", through=view.seq, kind=ErrorKind.not_found.value))
                continue
            if m.state == "invalid" or m.spec is None:
                out.append(Reject(model=m.name, through=view.seq, kind=ErrorKind.bad_request.value,
                                  reason=f"model {m.name} cannot be served: {m.reason}"))
                continue
            if m.crashes >= self.max_crashes and now - m.failed_at < self.retry_failed_s:
                out.append(Reject(
                    model=m.name, through=view.seq, kind=ErrorKind.unavailable.value,
                    reason=(f"the worker of model {m.name} crashed {m.crashes} times, the last {now - m.failed_at:.0f} s "
                            f"ago ({m.reason}); it is retried {self.retry_failed_s:g} s after a crash"),
                ))
                continue
            if m.state == "failed" and now - m.failed_at < self.retry_failed_s:
                out.append(Reject(
                    model=m.name, through=view.seq, kind=ErrorKind.unavailable.value,
                    reason=(f"model {m.name} failed to load {now - m.failed_at:.0f} s ago ({m.reason}); "
                            f"it is retried {self.retry_failed_s:g} s after a failure"),
                ))
                continue
            if not devices or (not has_gpu and m.spec.backend in GPU_ONLY_BACKENDS):
                why = (f"model {m.name} runs on {m.spec.backend}, which needs a GPU, and this server has none"
                       if devices else f"model {m.name} has no device to run on")
                if lost:
                    why += " available (" + "; ".join(f"{d}: {r}" for d, r in sorted(lost.items())) + ")"
                out.append(Reject(model=m.name, through=view.seq, kind=ErrorKind.unavailable.value, reason=why))
                continue
            if any(held.values()) and devices and needs(m) <= biggest:
                d = max(devices, key=lambda d: d.budget_bytes - held[d.name])
                if needs(m) > d.budget_bytes - held[d.name]:
                    pins = sorted(x.name for x in models.values()
                                  if x.pinned and x.device == d.name and x.state in _PLACED)
                    out.append(Reject(model=m.name, through=view.seq, kind=ErrorKind.insufficient_memory.value, reason=(
                        f"model {m.name} needs {format_bytes(needs(m))} but at most "
                        f"{format_bytes(d.budget_bytes - held[d.name])} of {d.name} is not held by pinned models "
                        f"({', '.join(pins)}); unpin one to make room")))
                    continue
            more = needs(m) - (m.bytes if m.state == "parked" else 0)  # a parked model holds its runtime already
            if spare < more and needs(m) <= biggest:
                continue  # memory is held by busy or loading models: the requests keep waiting
            decided = len(out)
            self._place(view, m, n, now, used, leaving, out, devices, idle, host)
            if len(out) != decided:
                spare = reach()
        if tick:
            pinned = [("pinned", models[name]) for name in sorted(models) if models[name].pinned]
            if pinned:
                self.load_into_free(view, pinned, used, devices, out)
            self.on_tick(view, now, used, leaving, devices, idle, out)
        return out

    def _place(self, view: ClusterView, m: ModelView, n: int, now: float, used: dict[str, int],
               leaving: set[str], out: list[Decision], devices: list, idle: dict[str, list[ModelView]],
               host: list[int] | None = None) -> None:
        host = host if host is not None else []
        need = needs(m)
        waking = m.state == "parked"
        elsewhere = [d for d in devices if runs_on(m, d) and d.name != m.device]
        devices = [d for d in devices if runs_on(m, d) and (not waking or d.name == m.device)]
        if waking:
            if m.name in leaving:
                return  # evicted already (its device is unavailable)
            if not devices or need > devices[0].budget_bytes:
                where = view.devices.get(m.device)
                out.append(Evict(model=m.name, reason=(
                    f"parked on {m.device}, which is unavailable ({where.unavailable})" if where is not None and where.unavailable
                    else f"parked on {m.device}, where it no longer fits (needs {format_bytes(need)})")
                    + f"; {n} request(s) waiting: it loads again where it fits"))
                leaving.add(m.name)
                return
            d = devices[0]
            if not self._wake(view, m, n, now, used, leaving, out, d, idle, host):
                # nothing idle there makes room now. Busy models end, so it waits for them; but
                # when pinned models hold so much of its GPU that it can never wake there, it loads
                # on another GPU that has room now
                pinned = sum(x.bytes for x in view.models.values() if x.device == d.name and x.name != m.name
                             and x.state in _PLACED and self.protected(x))
                room = [o for o in elsewhere if o.kind == "gpu" and need <= o.budget_bytes - used[o.name]]
                if room and need > d.budget_bytes - pinned:
                    out.append(Evict(model=m.name, reason=(
                        f"parked on {d.name}, where pinned models hold {format_bytes(pinned)} of "
                        f"{format_bytes(d.budget_bytes)}: it can never wake there (it needs {format_bytes(need)}); "
                        f"{n} request(s) waiting: it loads again on {room[0].name}, which has room")))
                    leaving.add(m.name)
                    used[room[0].name] += need  # kept for it: nothing else in this pass takes that room
            return
        if not devices:
            return
        placed: dict[str, int] = {}  # device -> models placed there (loading or ready, not leaving)
        limits = {d.name: self.max_models(d) for d in devices}
        if any(v is not None for v in limits.values()):
            for x in view.models.values():
                if x.device is not None and x.state in _PLACED and x.name not in leaving:
                    placed[x.device] = placed.get(x.device, 0) + 1
        # best fit: of the devices with room, the one it leaves least free (GPUs before the CPU),
        # so that large holes stay for large models
        fits = [(d.kind != "gpu", d.budget_bytes - used[d.name] - need, d.name, d) for d in devices
                if need <= d.budget_bytes - used[d.name]
                and (limits[d.name] is None or placed.get(d.name, 0) < limits[d.name])]
        if fits:
            *_, d = min(fits, key=lambda f: f[:3])
            free = d.budget_bytes - used[d.name]
            others = len(fits) - 1
            out.append(Load(model=m.name, device=d.name, bytes=need, reason=(
                f"{n} request(s) waiting; needs {format_bytes(need)}{needs_note(m)}, "
                f"{format_bytes(free)} free on {d.name}"
                + (f" (best fit of {others + 1} devices with room)" if others else ""))))
            used[d.name] += need
            return
        # every device where evicting idle models makes room, with the victims it would take
        # (first in victim order); GPUs before the CPU, and among them the device whose worst
        # victim is the best (least recently used, for this policy): across devices as within one
        options = []
        for d in devices:
            if need > d.budget_bytes:
                continue
            free = d.budget_bytes - used[d.name]
            over = placed.get(d.name, 0) - limits[d.name] + 1 if limits[d.name] is not None else 0
            plan = self._victims(view, d, need, free, idle, leaving, host, over)
            if plan is not None:
                chosen, room = plan
                options.append((d.kind != "gpu", max(self.victim_key(x, now) for x, _ in chosen), d.name, d, chosen,
                                free, room))
        if options:
            *_, d, chosen, free, room = min(options, key=lambda o: o[:3])
            wait, waited = self.defer(view, m, n, d, chosen, leaving, now)
            if wait:
                return  # a model ranking below the victims frees memory soon: the requests wait for it
            self._make_room(view, m, need, d, chosen, free, now, used, leaving, out, host)
            out.append(Load(model=m.name, device=d.name, bytes=need, reason=(
                f"{n} request(s) waiting; needs {format_bytes(need)}, {format_bytes(room)} free on "
                f"{d.name} after {_made_room(chosen)}"
                + (f" (at most {limits[d.name]} models on {d.name})" if over > 0 else "") + waited)))
            used[d.name] += need
            return
        biggest = max(devices, key=lambda d: d.budget_bytes)
        if need > biggest.budget_bytes:
            out.append(Reject(model=m.name, through=view.seq, kind=ErrorKind.insufficient_memory.value, reason=(
                f"model {m.name} needs {format_bytes(need)} but the largest device budget is "
                f"{format_bytes(biggest.budget_bytes)} ({biggest.name})")))
        # otherwise memory is held by busy or loading models: the requests keep waiting

    def defer(self, view: ClusterView, m: ModelView, n: int, d: Any, chosen: list, leaving: set[str],
              now: float) -> tuple[bool, str]:
        """Whether ``m``'s load waits rather than evict ``chosen`` on ``d`` now (this policy: never),
        and words for the load's reason when it waited and waits no longer."""
        return False, ""

    def _victims(self, view: ClusterView, d: Any, need: int, free: int, idle: dict[str, list[ModelView]],
                 leaving: set[str], host: list[int], over: int = 0) -> tuple[list[tuple[ModelView, Any]], int] | None:
        """The victims (first in victim order) whose leaving gives ``need`` bytes on ``d``, each with
        its park plan (None: evicted; see :meth:`park_plan`), and the room they leave; None when
        they cannot. A parked victim frees its runtime; a parking one what its weights held."""
        chosen: list[tuple[ModelView, Any]] = []
        room = free
        host_left = list(host)
        for x in idle.get(d.name, ()):
            if room >= need and len(chosen) >= over:
                break
            if x.name in leaving:
                continue
            plan = self.park_plan(x, d, host_left) if x.state == "ready" else None
            if plan is not None:
                host_left[0] -= plan[0]
                room += x.bytes - plan[1]
            else:
                room += x.bytes
            chosen.append((x, plan))
        if room >= need and chosen and len(chosen) >= over:
            return chosen, room
        return None

    def _make_room(self, view: ClusterView, m: ModelView, need: int, d: Any, chosen: list, free: int, now: float,
                   used: dict[str, int], leaving: set[str], out: list[Decision], host: list[int]) -> None:
        for x, plan in chosen:
            why = (f"{self.victim_reason(x, now, d.name)}; making room for {m.name}, which needs "
                   f"{format_bytes(need)} with {format_bytes(free)} free")
            if plan is not None:
                host_bytes, keep = plan
                out.append(Park(model=x.name, device=d.name, host_bytes=host_bytes, keep_bytes=keep, reason=(
                    f"{why}; parked: its weights ({format_bytes(host_bytes)}) to host memory, "
                    f"{format_bytes(host[0])} of it free")))
                host[0] -= host_bytes
                used[d.name] -= x.bytes - keep
            else:
                out.append(Evict(model=x.name, reason=why))
                used[d.name] -= x.bytes
            leaving.add(x.name)

    def _wake(self, view: ClusterView, m: ModelView, n: int, now: float, used: dict[str, int], leaving: set[str],
              out: list[Decision], d: Any, idle: dict[str, list[ModelView]], host: list[int]) -> bool:
        """Wake parked ``m`` on its device ``d``: it holds its runtime there, and needs the rest.
        False when nothing there makes room now (its host bytes come back at ``Woken``)."""
        more = wake_more(m)
        free = d.budget_bytes - used[d.name]
        why = f"{n} request(s) waiting"
        if more <= free:
            out.append(wake_of(m, d.name, why, f"{format_bytes(free)} free"))
            used[d.name] += more
            return True
        victims = {d.name: [x for x in idle.get(d.name, ()) if x.name != m.name]}
        plan = self._victims(view, d, more, free, victims, leaving, host)
        if plan is None:
            return False
        chosen, room = plan
        self._make_room(view, m, more, d, chosen, free, now, used, leaving, out, host)
        out.append(wake_of(m, d.name, why, f"{format_bytes(room)} free after {_made_room(chosen)}"))
        used[d.name] += more
        return True


def _made_room(chosen: list) -> str:
    """Words for the victims of a placement: "evicting a, b" and/or "parking c"."""
    evicted = [x.name for x, plan in chosen if plan is None]
    parked = [x.name for x, plan in chosen if plan is not None]
    parts = ([f"evicting {', '.join(evicted)}"] if evicted else []) + ([f"parking {', '.join(parked)}"] if parked else [])
    return " and ".join(parts)
