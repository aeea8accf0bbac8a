"""``modelium load|unload|pin|unpin MODEL``: operators' controls of a running server, over HTTP.

Each calls ``POST /admin/models/{MODEL}/{action}`` (see ``modelium.api.operator``) on ``--url``
(default: the settings' host and port, http://127.0.0.1:8000) with the administrator key of
``--key`` or ``MODELIUM_API_KEY``, and prints the logged decision (``--json``: the server's answer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT_S = 30.0


def _default_url() -> str:
    try:
        from modelium.core.config import load_settings

        s = load_settings()
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
        return f"http://{host}:{s.port}"
    except Exception:  # noqa: BLE001 - a bad settings file must not hide the default
        return "http://127.0.0.1:8000"


def _call(url: str, key: str | None, model: str, action: str, body: dict) -> tuple[int, dict]:
    """POST the action; (status, JSON answer). Raises OSError when no server answers."""
    target = f"{url.rstrip('/')}/admin/models/{urllib.parse.quote(model, safe='')}/{action}"
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(target, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": {"message": raw.decode(errors="replace")[:500] or e.reason}}


def _run(args: argparse.Namespace) -> int:
    url = args.url or _default_url()
    key = args.key or os.environ.get("MODELIUM_API_KEY") or None
    body: dict = {}
    if getattr(args, "device", None):
        body["device"] = args.device
    if args.reason:
        body["reason"] = args.reason
    try:
        status, answer = _call(url, key, args.model, args.command, body)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        msg = f"no Modelium server answered at {url} ({reason}); start one with `modelium serve` or pass --url"
        if args.json:
            print(json.dumps({"error": {"message": msg, "type": "connection_error"}}))
        else:
            print(f"modelium: {msg}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(answer if status < 400 else {"status": status, **answer}))
    if status >= 400:
        if not args.json:
            err = answer.get("error", {}) if isinstance(answer, dict) else {}
            print(f"modelium: {args.command} {args.model} refused ({status}): {err.get('message', answer)}",
                  file=sys.stderr)
        return 1
    if not args.json:
        line = f"{args.command} {args.model}: logged at seq {answer.get('seq')}"
        if answer.get("device"):
            line += f" on {answer['device']}"
        if answer.get("reason"):
            line += f" ({answer['reason']})"
        print(line)
    return 0


def add_commands(sub) -> None:
    """``load``, ``unload``, ``pin`` and ``unpin`` on the ``modelium`` command's subparsers."""
    helps = {"load": "load a model now (no request needed; nothing is evicted for it)",
             "unload": "unload a loaded model (after its requests in flight)",
             "pin": "keep a model loaded: never evicted, loaded when memory allows, across restarts",
             "unpin": "let the policy unload a pinned model again"}
    for action, text in helps.items():
        p = sub.add_parser(action, help=text)
        p.add_argument("model")
        if action == "load":
            p.add_argument("--device", help="the device to load on, e.g. cpu or gpu:0 (default: the first where it fits)")
        p.add_argument("--reason", default="", help="why, for the event log")
        p.add_argument("--url", help="the server (default: the settings' host and port, http://127.0.0.1:8000)")
        p.add_argument("--key", help="an administrator API key (default: $MODELIUM_API_KEY)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=_run)
