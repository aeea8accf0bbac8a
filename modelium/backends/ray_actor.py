"""The transformers worker inside a Ray actor (the code that runs on a cluster's node).

:class:`ModelActor` is the worker process of :mod:`modelium.backends.hf_worker` with Ray calls
in place of the socket: the same :class:`~modelium.backends.hf_worker.Worker` loads the model
(:func:`~modelium.backends.hf_worker.load_model`) and runs its engine (continuous batching for
generation, dynamic batching for encoders); only the channel differs. Where the worker writes
frames to its socket, :class:`Relay` sorts them by job into per-job queues, and
:meth:`ModelActor.generate` (a Ray streaming generator) yields each job's frames as they come, a
batch at a time. The engine runs on a thread of its own (Ray calls the actor's methods on a
pool of threads: the actor is created with ``max_concurrency`` above the worker's batch).

This module does not import Ray: :mod:`modelium.backends.ray` wraps the class with
``ray.remote`` on the server's side, and Ray imports this module on the node.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

import msgspec

from modelium.backends import hf_worker
from modelium.backends.framing import HEADER, MAX_FRAME
from modelium.core.messages import (
    CancelJob,
    Done,
    Encoded,
    Failed,
    FromWorker,
    InferRequest,
    Job,
    LoadModel,
    ModelLoaded,
)

log = logging.getLogger("modelium.ray_actor")

TERMINAL = (Done, Encoded, Failed)


class Relay:
    """The worker's channel (``send``, ``send_encoded``, ``max_frame``, as
    :class:`~modelium.backends.framing.SyncChannel`): frames go to the queue of their job
    (``open``), the load's answer (``ModelLoaded`` or ``Failed`` with id 0) to ``loads``."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self.loads: queue.Queue[Any] = queue.Queue()
        self._jobs: dict[int, queue.Queue[Any]] = {}
        self._lock = threading.Lock()
        self._decoder = msgspec.msgpack.Decoder(FromWorker)

    def open(self, job_id: int) -> queue.Queue[Any]:
        q: queue.Queue[Any] = queue.Queue()
        with self._lock:
            self._jobs[job_id] = q
        return q

    def close(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def send(self, frame: Any) -> None:
        if isinstance(frame, ModelLoaded) or (isinstance(frame, Failed) and not frame.id):
            self.loads.put(frame)
            return
        with self._lock:
            q = self._jobs.get(getattr(frame, "id", -1))
        if q is not None:
            q.put(frame)

    def send_encoded(self, data: bytes) -> None:
        """Frames encoded by the worker's outbox (several, joined): decoded and sorted."""
        view, at = memoryview(data), 0
        while at < len(view):
            (n,) = HEADER.unpack(view[at:at + HEADER.size])
            at += HEADER.size
            self.send(self._decoder.decode(view[at:at + n]))
            at += n


class ModelActor:
    """One model's worker on a node. Made by :class:`modelium.backends.ray.RayBackend`."""

    def __init__(self, tag: str = ""):
        self.tag = tag  # the server's worker tag (in the actor's name too)
        hf_worker._quiet_libraries()
        torch, transformers = hf_worker.import_libraries()
        self.relay = Relay()
        self.worker = hf_worker.Worker(self.relay, torch, transformers)
        self._stopped = threading.Event()
        threading.Thread(target=self.worker.serve, name="engine", daemon=True).start()

    def hello(self) -> dict[str, Any]:
        """Where this actor runs: its process and node."""
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname()}

    def load(self, msg: LoadModel, timeout_s: float | None = None) -> ModelLoaded | Failed:
        """Load the model (once): the worker's ``ModelLoaded``, or its ``Failed`` (id 0)."""
        self.worker.on_frame(msg)
        try:
            return self.relay.loads.get(timeout=timeout_s)
        except queue.Empty:
            return Failed(kind="unavailable", message="the model did not load in time",
                          detail=f"no answer from the worker within {timeout_s} s")

    def generate(self, job_id: int, request: InferRequest):
        """Run one request; yields lists of its frames as they come (the last list ends with
        its ``Done``, ``Encoded`` or ``Failed``). Called with ``num_returns="streaming"``."""
        q = self.relay.open(job_id)
        try:
            self.worker.on_frame(Job(id=job_id, request=request))
            while True:
                frames = [q.get()]
                while True:
                    try:
                        frames.append(q.get_nowait())
                    except queue.Empty:
                        break
                yield frames
                if isinstance(frames[-1], TERMINAL) or any(isinstance(f, TERMINAL) for f in frames):
                    return
        finally:
            self.relay.close(job_id)

    def cancel(self, job_id: int) -> None:
        """Stop a job before its next decode step (it ends with ``Done`` and ``cancelled``)."""
        self.worker.on_frame(CancelJob(id=job_id))

    def memory_bytes(self) -> int:
        """This process's resident memory now."""
        return hf_worker._rss_bytes()

    def wait_stopped(self) -> None:
        """Returns only when the actor is told to stop: a call pending on it fails the moment the
        actor dies (its node left the cluster, it was killed), which is how the server learns."""
        self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()
