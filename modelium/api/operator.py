"""Operators' controls: ``POST /admin/models/{name}/load|unload|pin|unpin`` (administrators only).

* ``load`` (optional JSON ``{"device": "cpu", "reason": "..."}``) and ``unload`` are logged as an
  :class:`OperatorAction` (who asked, what, why) followed at once by the decision it gives: a
  ``Load`` or ``Evict`` with ``policy="operator"`` whose ``trigger`` is the action's seq. The
  executor carries it out like any decision of the brain; the brain folds it into its view (it is
  not its own) and incident replay counts it as *given*.
* ``pin`` / ``unpin`` are logged as :class:`Pinned` / :class:`Unpinned`; the registry fold keeps the
  pin across restarts, and every policy treats a pinned model as protected (never a victim, never
  unloaded for idleness) and loads it on a ``Tick`` when it fits in free memory.

The rule for a load: nothing is evicted for it, and a model the policy is placing itself (one with
requests waiting, or a pinned one) is refused, so that the two never race. The model goes on the device asked for, or else on
the first device (GPUs first, then by name) where it fits in the memory not placed for loading or
ready models, as the registry says. A model larger than every budget (or the one asked for) is
refused with 507 ``insufficient_memory``; one that would fit once other models are unloaded is
refused with 409 ``conflict``, naming them. Every answer that is not an error is 202 with the seq
of the logged event, once it is durable.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, ValidationError
from quart import request
from quart_trio import QuartTrio

from modelium.api.errors import validation_error
from modelium.api.principal import Principal, principal
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import OPERATOR, Evict, Load, OperatorAction, Pinned, Unpinned, Wake
from modelium.core.policies.base import needs, wake_more, wake_of
from modelium.hardware import format_bytes

ACTIONS = ("load", "unload", "pin", "unpin")
_LOADABLE = ("discovered", "unloaded", "failed")
_PLACED = ("loading", "ready")


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str | None = None  # load only: the device to load on (default: the first where it fits)
    reason: str = ""  # why, for the log


def _who(p: Principal) -> str:
    return f"key {p.key_id}" if p.key_id else "the administrator"


def _find(registry: Any, name: str) -> Any:
    m = registry.models.get(name)
    if m is None or m.removed:
        raise ModeliumError(ErrorKind.not_found, f"the model '{name[:200]}' does not exist", param="model")
    return m


def load_decision(registry: Any, name: str, device: str | None, why: str) -> Load | Wake:
    """The ``Load`` an operator's load of ``name`` gives, from the registry (pure); a parked model
    is woken on its device (``Wake``); a :class:`ModeliumError` with the reason when it cannot be
    loaded now."""
    m = _find(registry, name)
    if m.state == "invalid" or m.spec is None:
        raise ModeliumError(ErrorKind.conflict, f"model {name} cannot be served: {m.reason}")
    if m.state == "parked":
        if m.waiting:
            raise ModeliumError(ErrorKind.conflict, f"model {name} has {len(m.waiting)} request(s) waiting: "
                                                    "the policy wakes it for them as soon as its GPU has room")
        if device is not None and device != m.device:
            raise ModeliumError(ErrorKind.conflict, f"model {name} is parked on {m.device}: it wakes there (unload it "
                                                    f"first to load it on {device[:100]})", param="device")
        d = registry.devices[m.device]
        free = d.budget_bytes - registry.used_bytes(d.name)
        if d.unavailable or wake_more(m) > free:
            raise ModeliumError(ErrorKind.conflict, (
                f"model {name} is parked on {d.name}, which is unavailable ({d.unavailable})" if d.unavailable else
                f"model {name} is parked on {d.name} and needs {format_bytes(wake_more(m))} more to wake, "
                f"{format_bytes(free)} free; an operator's load evicts nothing: unload a model first"))
        return wake_of(m, d.name, why, f"{format_bytes(free)} free", policy=OPERATOR)
    if m.state in _PLACED:
        raise ModeliumError(ErrorKind.conflict, f"model {name} is already {m.state} on {m.device}")
    if m.state not in _LOADABLE:
        raise ModeliumError(ErrorKind.conflict, f"model {name} is {m.state}; try again once it is unloaded")
    # the policy places these itself: an operator's load beside its own would race it
    if m.waiting:
        raise ModeliumError(ErrorKind.conflict, f"model {name} has {len(m.waiting)} request(s) waiting: "
                                                "the policy is placing it")
    if m.pinned:
        raise ModeliumError(ErrorKind.conflict, f"model {name} is pinned: the policy loads it when memory allows")
    if device is not None and (device not in registry.devices or registry.devices[device].kind == "host"):
        raise ModeliumError(ErrorKind.bad_request, f"no device '{device[:100]}' here; devices: "
                                                   f"{', '.join(sorted(n for n, d in registry.devices.items() if d.kind != 'host'))}",
                                                   param="device")
    need = needs(m)
    devices = sorted((d for d in registry.devices.values() if d.kind != "host"), key=lambda d: (d.kind != "gpu", d.name))
    if device is not None:
        devices = [d for d in devices if d.name == device]
    if not devices:
        raise ModeliumError(ErrorKind.conflict, "no device is registered yet")
    for d in devices:
        free = d.budget_bytes - registry.used_bytes(d.name)
        if need <= free:
            return Load(model=name, device=d.name, bytes=need, policy=OPERATOR, reason=(
                f"{why}; needs {format_bytes(need)}, {format_bytes(free)} free on {d.name}"))
    biggest = max(devices, key=lambda d: d.budget_bytes)
    if need > biggest.budget_bytes:
        raise ModeliumError(ErrorKind.insufficient_memory, (
            f"model {name} needs {format_bytes(need)} but the largest budget is "
            f"{format_bytes(biggest.budget_bytes)} ({biggest.name})"))
    where = []
    for d in devices:
        held = sorted(x.name for x in registry.models.values() if x.device == d.name and x.state in _PLACED)
        where.append(f"{d.name}: {format_bytes(d.budget_bytes - registry.used_bytes(d.name))} free, "
                     f"held by {', '.join(held) or 'nothing'}")
    raise ModeliumError(ErrorKind.conflict, (
        f"model {name} needs {format_bytes(need)}, more than is free ({'; '.join(where)}); "
        "an operator's load evicts nothing: unload a model first"))


def unload_decision(registry: Any, name: str, why: str) -> Evict:
    """The ``Evict`` an operator's unload of ``name`` gives (pure); a :class:`ModeliumError`
    with the reason when it cannot be unloaded now."""
    m = _find(registry, name)
    if m.pinned:
        raise ModeliumError(ErrorKind.conflict, f"model {name} is pinned; unpin it first")
    if m.state not in ("ready", "parked"):
        raise ModeliumError(ErrorKind.conflict, f"model {name} is {m.state}, not loaded and ready"
                                                + (": try again once it is ready" if m.state == "loading" else ""))
    return Evict(model=name, policy=OPERATOR, reason=why)


async def _body() -> ActionBody:
    raw = await request.get_data()
    if not raw.strip():
        return ActionBody()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModeliumError(ErrorKind.bad_request, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ModeliumError(ErrorKind.bad_request, "the request body must be a JSON object")
    try:
        return ActionBody.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def add_operator_routes(app: QuartTrio, system: Any) -> None:
    registry = system.registry
    log = system.log

    @app.post("/admin/models/<name>/<action>")
    async def operator_action(name: str, action: str):
        """An administrator loads, unloads, pins or unpins a model (202 once it is logged)."""
        who = principal()
        if not who.admin:
            raise ModeliumError(ErrorKind.forbidden, "operators' controls are for administrators")
        if action not in ACTIONS:
            raise ModeliumError(ErrorKind.not_found, f"no action '{action[:50]}'; actions: {', '.join(ACTIONS)}")
        if getattr(system, "stopping", False):
            raise ModeliumError(ErrorKind.shutting_down, "the server is shutting down")
        body = await _body()
        if body.device is not None and action != "load":
            raise ModeliumError(ErrorKind.bad_request, "only a load takes a device", param="device")
        why = f"{action} by {_who(who)}" + (f": {body.reason}" if body.reason else "")
        # from the check to the publish nothing awaits: the registry cannot change in between
        out: dict[str, Any] = {"model": name, "action": action}
        if action in ("pin", "unpin"):
            _find(registry, name)
            event = (Pinned if action == "pin" else Unpinned)(model=name, key_id=who.key_id, tenant=who.tenant,
                                                              reason=body.reason)
            seq = log.publish(event)
        else:
            decision = (load_decision(registry, name, body.device, why) if action == "load"
                        else unload_decision(registry, name, why))
            trigger = log.publish(OperatorAction(action=action, model=name, device=getattr(decision, "device", ""),
                                                 key_id=who.key_id, tenant=who.tenant, reason=body.reason))
            seq = log.publish(msgspec.structs.replace(decision, trigger=trigger))
            out.update(trigger=trigger, reason=decision.reason)
            if isinstance(decision, (Load, Wake)):
                out.update(device=decision.device, bytes=decision.bytes)
        await log.flush(seq)  # the 202 promises the decision survives a crash
        out["seq"] = seq
        return out, 202
