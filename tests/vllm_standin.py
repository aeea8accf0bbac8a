"""A STAND-IN for ``vllm serve``, for tests only: it loads no model and runs on the CPU.

vLLM needs a GPU and gigabytes of packages, so the vLLM backend is tested against this script,
through the same process and HTTP machinery as the real server. It takes the command line of
``vllm serve`` (``[serve] PATH --host --port --served-model-name --gpu-memory-utilization
--max-model-len [--enable-sleep-mode] [--trust-remote-code]``) and serves the same routes:
``/health``, ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (streamed as
server-sent events or not, with ``usage``; ``stream_options.include_usage`` and
``continuous_usage_stats`` as vLLM has them), ``/v1/embeddings``, and, with
``VLLM_SERVER_DEV_MODE=1`` and ``--enable-sleep-mode``, ``POST /sleep?level=N``,
``POST /wake_up`` and ``GET /is_sleeping`` (a request while asleep is refused with 503).

Its answers are deterministic: a generation is the words of the prompt in reverse order (a chat:
of the last message), one word per token (``" word"`` after the first), up to ``max_tokens``
(``finish_reason`` "length") or the end of the words ("stop"), cut before a ``stop`` string;
each choice of ``n`` is the same. :func:`answer_tokens` computes it. An embedding is
:func:`embedding_of` the input. Prompt tokens are the prompt's words (:func:`count_words`).

Driven by the environment:

``VLLM_STANDIN_RECORD``       a file that gets ``{"argv", "args", "env", "pid"}`` (JSON) at start
``VLLM_STANDIN_EVENTS``       a file that gets one JSON line per event: ``request``,
                              ``disconnect`` (a streaming client went away), ``finished``, ``sleep``,
                              ``wake_up``, ``sigterm``
``VLLM_STANDIN_TOKEN_DELAY``  seconds between two streamed tokens (default 0.02)
``VLLM_STANDIN_READY_AFTER``  seconds before ``/health`` answers 200 (503 until then); ``never``
``VLLM_STANDIN_EXIT_AT_START`` exit with this code right after printing an error (a bad load)
``VLLM_STANDIN_IGNORE_SIGTERM`` ``1``: SIGTERM is logged and ignored (only SIGKILL ends it)
``VLLM_STANDIN_CRASH_AFTER``  N: the N-th generation request kills the process (exit code 3)
                              after sending its first token
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

EMBED_DIM = 8


# ------------------------------------------------------------------------------------ answers


def count_words(text: str) -> int:
    return len(text.split())


def answer_tokens(prompt: str, max_tokens: int | None, stop: list[str] | None = None) -> tuple[list[str], str]:
    """(token texts, finish reason) of the stand-in's deterministic answer to ``prompt``."""
    words = list(reversed(prompt.split()))
    limit = len(words) if max_tokens is None else max_tokens
    tokens = [(" " if i else "") + w for i, w in enumerate(words[:limit])]
    finish = "length" if max_tokens is not None and len(words) > max_tokens else "stop"
    if stop:
        text = ""
        for i, t in enumerate(tokens):
            text += t
            hits = [text.find(s) for s in stop if s and s in text]
            if hits:  # cut before the stop string, even where it began in an earlier token
                cut, out, pos = min(hits), [], 0
                for tok in tokens[:i + 1]:
                    if pos + len(tok) > cut:
                        if cut > pos:
                            out.append(tok[:cut - pos])
                        break
                    out.append(tok)
                    pos += len(tok)
                return out, "stop"
    return tokens, finish


def embedding_of(text: str) -> list[float]:
    """A deterministic unit vector of :data:`EMBED_DIM` floats (exact in float32)."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(b - 127.5) / 128.0 for b in digest[:EMBED_DIM]]
    norm = sum(v * v for v in raw) ** 0.5
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in raw]


# ------------------------------------------------------------------------------------ the server


class State:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.monotonic()
        ready = os.environ.get("VLLM_STANDIN_READY_AFTER", "0")
        self.ready_after = float("inf") if ready == "never" else float(ready)
        self.delay = float(os.environ.get("VLLM_STANDIN_TOKEN_DELAY", "0.02"))
        self.crash_after = int(os.environ.get("VLLM_STANDIN_CRASH_AFTER", "0") or 0)
        self.dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        self.sleeping = False
        self.generations = 0
        self.lock = threading.Lock()
        self.events_path = os.environ.get("VLLM_STANDIN_EVENTS", "")

    def event(self, kind: str, **fields) -> None:
        line = json.dumps({"event": kind, "t": time.time(), **fields})
        print(f"stand-in: {line}", flush=True)
        if self.events_path:
            with self.lock, open(self.events_path, "a") as f:
                f.write(line + "\n")


class Gone(Exception):
    """The client closed its connection."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vllm-standin/1"
    state: State

    def log_message(self, format, *args):
        print("stand-in: " + format % args, flush=True)

    # -- helpers ----------------------------------------------------------------------------

    def send_json(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status: int, message: str, etype: str = "BadRequestError") -> None:
        self.send_json(status, {"object": "error", "message": message, "type": etype, "param": None,
                                "code": status})

    def body(self) -> dict | None:
        n = int(self.headers.get("Content-Length") or 0)
        try:
            data = json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            self.error(400, "the body is not JSON")
            return None
        if not isinstance(data, dict):
            self.error(400, "the body must be a JSON object")
            return None
        return data

    def client_gone(self) -> bool:
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def chunk(self, data: bytes) -> None:
        if self.client_gone():
            raise Gone()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError:
            raise Gone() from None

    def sse(self, obj) -> None:
        self.chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self):
        st = self.state
        path = urlparse(self.path).path
        if path == "/health":
            if time.monotonic() - st.started < st.ready_after:
                self.error(503, "still loading", "ServiceUnavailable")
            else:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{
                "id": st.args.served_model_name, "object": "model", "owned_by": "vllm", "root": st.args.path,
                "max_model_len": st.args.max_model_len}]})
        elif path == "/is_sleeping" and st.dev_mode:
            self.send_json(200, {"is_sleeping": st.sleeping})
        else:
            self.error(404, f"no route {path}", "NotFoundError")

    def do_POST(self):
        st = self.state
        url = urlparse(self.path)
        path = url.path
        if path in ("/sleep", "/wake_up") and st.dev_mode:
            self.body()
            if not st.args.enable_sleep_mode:
                self.error(400, "Sleep mode is not enabled (--enable-sleep-mode)")
                return
            if path == "/sleep":
                level = parse_qs(url.query).get("level", ["1"])[0]
                st.sleeping = True
                st.event("sleep", level=level)
            else:
                st.sleeping = False
                st.event("wake_up")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path not in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
            self.error(404, f"no route {path}", "NotFoundError")
            return
        body = self.body()
        if body is None:
            return
        if body.get("model") != st.args.served_model_name:
            self.error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            return
        if st.sleeping:
            self.error(503, "the engine is sleeping", "ServiceUnavailable")
            return
        if path == "/v1/embeddings":
            self.embeddings(body)
        else:
            self.generate(body, chat=path.endswith("chat/completions"))

    def embeddings(self, body: dict) -> None:
        inp = body.get("input")
        if isinstance(inp, str):
            texts = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            texts = [" ".join(map(str, inp))]
        elif isinstance(inp, list) and all(isinstance(x, str) for x in inp):
            texts = inp
        elif isinstance(inp, list) and all(isinstance(x, list) for x in inp):
            texts = [" ".join(map(str, x)) for x in inp]
        else:
            self.error(400, "input must be a string, a list of strings or of token id lists")
            return
        self.state.event("request", path="/v1/embeddings", inputs=len(texts))
        prompt = sum(count_words(t) for t in texts)
        self.send_json(200, {"object": "list", "model": body["model"],
                             "data": [{"object": "embedding", "index": i, "embedding": embedding_of(t)}
                                      for i, t in enumerate(texts)],
                             "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})

    def generate(self, body: dict, chat: bool) -> None:
        st = self.state
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                self.error(400, "messages must be a non-empty list")
                return
            prompt = str(messages[-1].get("content", ""))
            prompt_tokens = sum(count_words(str(m.get("content", ""))) for m in messages)
        else:
            p = body.get("prompt")
            if isinstance(p, list) and all(isinstance(x, int) for x in p):
                prompt = " ".join(map(str, p))
            elif isinstance(p, str):
                prompt = p
            else:
                self.error(400, "prompt must be a string or a list of token ids")
                return
            prompt_tokens = count_words(prompt)
        max_tokens = body.get("max_tokens", None if chat else 16)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        n = int(body.get("n") or 1)
        tokens, finish = answer_tokens(prompt, max_tokens, stop)
        if prompt_tokens + len(tokens) > st.args.max_model_len:
            self.error(400, f"This model's maximum context length is {st.args.max_model_len} tokens.")
            return
        with st.lock:
            st.generations += 1
            number = st.generations
        crash = st.crash_after and number == st.crash_after
        echo = prompt if body.get("echo") and not chat else ""
        st.event("request", path=self.path, number=number, stream=bool(body.get("stream")), body=body)
        completion = len(tokens) * n
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        rid = f"{'chatcmpl' if chat else 'cmpl'}-standin-{number}"
        if not body.get("stream"):
            if crash:
                st.event("crash", number=number)
                os._exit(3)
            time.sleep(st.delay * len(tokens))
            text = echo + "".join(tokens)
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish} for i in range(n)]
            else:
                choices = [{"index": i, "text": text, "finish_reason": finish, "logprobs": None} for i in range(n)]
            self.send_json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "model": body["model"], "choices": choices, "usage": usage})
            st.event("finished", number=number)
            return
        opts = body.get("stream_options") or {}
        include_usage, continuous = bool(opts.get("include_usage")), bool(opts.get("continuous_usage_stats"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0

        def piece(i: int, text: str | None, fin: str | None, done: int) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                c = {"index": i, "delta": delta, "finish_reason": fin}
            else:
                c = {"index": i, "text": text or "", "finish_reason": fin}
            out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                   "model": body["model"], "choices": [c]}
            if include_usage and continuous:
                out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                                "total_tokens": prompt_tokens + done}
            return out

        try:
            if chat:
                for i in range(n):
                    self.sse({"id": rid, "object": "chat.completion.chunk", "model": body["model"],
                              "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]})
            done = 0
            for k, tok in enumerate(tokens):
                for i in range(n):
                    done += 1
                    last = k == len(tokens) - 1
                    text = (echo + tok) if k == 0 else tok
                    self.sse(piece(i, text, finish if last and not chat else None, done))
                    if chat and last:
                        self.sse(piece(i, None, finish, done))
                sent += 1
                if crash:
                    st.event("crash", number=number)
                    os._exit(3)
                time.sleep(st.delay)
            if not tokens:
                for i in range(n):
                    self.sse(piece(i, echo if not chat else None, finish, 0))
            if include_usage:
                self.sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                          "model": body["model"], "choices": [], "usage": usage})
            self.sse(b"[DONE]")
            self.chunk(b"")
            st.event("finished", number=number, sent=sent)
        except Gone:
            st.event("disconnect", number=number, sent=sent)
            self.close_connection = True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-standin", description="a stand-in for `vllm serve` (tests only)")
    p.add_argument("path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    if argv and argv[0] == "serve":
        argv = argv[1:]
    args = p.parse_args(argv)
    args.served_model_name = args.served_model_name or args.path
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    record = os.environ.get("VLLM_STANDIN_RECORD")
    if record:
        env = {k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "VLLM_", "MODELIUM_"))}
        with open(record, "w") as f:
            json.dump({"argv": argv, "args": vars(args), "env": env, "pid": os.getpid()}, f)
    code = os.environ.get("VLLM_STANDIN_EXIT_AT_START")
    if code:
        print(f"ERROR stand-in: cannot load the model at {args.path} (told to fail)", flush=True)
        sys.exit(int(code))
    state = State(args)
    if not 0 < args.gpu_memory_utilization <= 1:
        print(f"ERROR gpu_memory_utilization {args.gpu_memory_utilization} is not in (0, 1]", flush=True)
        sys.exit(2)

    def on_sigterm(signum, frame):
        if os.environ.get("VLLM_STANDIN_IGNORE_SIGTERM") == "1":
            state.event("sigterm", ignored=True)
            return
        state.event("sigterm", ignored=False)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    Handler.state = state
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"stand-in vllm serving {args.path} as {args.served_model_name} on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
