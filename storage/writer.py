"""The log's one writer: the file's lock and write connection, and the group commit.

Queued rows are committed in one transaction every ``commit_interval`` seconds or ``commit_rows``
rows, whichever comes first (WAL, one writer connection, ``BEGIN IMMEDIATE``); at once when
someone waits in :meth:`Writer.flush`. A snapshot queued with :meth:`Writer.queue_snapshot` is
stored in the transaction that commits the seq it was taken at (never before its events). Other
work on the connection (retention's compaction) takes turns with commits through
:meth:`Writer.transact`.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from storage.codec import Row
from storage.errors import LogError
from storage.logfile import KEEP_SNAPSHOTS, WriterLock, last_seq_of, open_for_writing

log = logging.getLogger("modelium.eventlog")

T = TypeVar("T")

Snapshot = tuple[int, str, float, bytes]  # (seq, schema, created, body)


class Writer:
    """Owns the log file for writing: its lock, its connection, the queue and the commits."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL", commit_interval: float = 0.010,
                 commit_rows: int = 4096, lock: bool = True):
        self.path = Path(path)
        self.synchronous = synchronous
        self.commit_interval = commit_interval
        self.commit_rows = commit_rows
        self._lock = WriterLock(self.path)
        if lock:
            self._lock.acquire()
        try:
            self._conn = open_for_writing(self.path, synchronous)
        except BaseException:
            self._lock.release()
            raise
        try:
            self.committed_seq: int = last_seq_of(self._conn, self.path)
        except BaseException:
            self._conn.close()
            self._lock.release()
            raise
        self._pending: list[Row] = []
        self._snapshots: list[Snapshot] = []  # waiting for their events
        self._wake = trio.Event()
        self._urgent = trio.Event()
        self._committed = trio.Event()
        self._turns = trio.Lock()  # the connection: commits and other work (compaction) take turns
        self.running = False
        self.closed = False
        self.commits = 0
        self.commit_failures = 0
        self.snapshots_written = 0

    # ---------------------------------------------------------------- queueing

    def append(self, row: Row) -> None:
        """Queue one events row (its seq follows the last one queued) for the next commit."""
        self._pending.append(row)
        if not self._wake.is_set():
            self._wake.set()

    def queue_snapshot(self, seq: int, schema: str, body: bytes) -> None:
        """Store ``body`` (a fold as of ``seq``) in the transaction that commits ``seq``."""
        self._snapshots.append((seq, schema, time.time(), body))
        if not self._wake.is_set():
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def flush(self, seq: int) -> None:
        """Wait until ``seq`` (queued already) is committed."""
        while self.committed_seq < seq:
            if not self.running:
                raise LogError("the event log's writer is not running")
            self._urgent.set()
            await self._committed.wait()

    # ---------------------------------------------------------------- committing

    def _take_snapshots(self, batch: Sequence[Row]) -> list[Snapshot]:
        """(Trio thread) the queued snapshots that the batch's last seq makes consistent."""
        upto = batch[-1][0] if batch else self.committed_seq
        snaps = [x for x in self._snapshots if x[0] <= upto]
        if snaps:
            self._snapshots = [x for x in self._snapshots if x[0] > upto]
        return snaps

    def _commit(self, batch: Sequence[Row], snaps: Sequence[Snapshot] = ()) -> None:
        """One transaction: the batch, then the snapshots its last seq makes consistent."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO events(seq, ts, type, model, v, body) VALUES (?,?,?,?,?,?)", batch)
            if snaps:
                conn.executemany("INSERT OR REPLACE INTO snapshots(seq, schema, created, body) VALUES (?,?,?,?)",
                                 snaps)
                conn.execute("DELETE FROM snapshots WHERE seq NOT IN "
                             "(SELECT seq FROM snapshots ORDER BY seq DESC LIMIT ?)", (KEEP_SNAPSHOTS,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.snapshots_written += len(snaps)

    def _mark_committed(self, seq: int) -> None:
        self.committed_seq = seq
        self.commits += 1
        self._committed.set()
        self._committed = trio.Event()

    def _commit_rest(self) -> None:
        """(Synchronously) commit everything queued."""
        batch, self._pending = self._pending, []
        self._commit(batch, self._take_snapshots(batch))
        if batch:
            self._mark_committed(batch[-1][0])

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Group-commit queued rows until cancelled, then commit the rest."""
        self.running = True
        task_status.started()
        try:
            while True:
                if not self._pending and not self._snapshots:
                    self._wake = trio.Event()
                    await self._wake.wait()
                if len(self._pending) < self.commit_rows and not self._urgent.is_set():
                    # gather more rows into this transaction, unless someone waits on flush
                    with trio.move_on_after(self.commit_interval):
                        await self._urgent.wait()
                self._urgent = trio.Event()
                batch, self._pending = self._pending[: self.commit_rows * 4], self._pending[self.commit_rows * 4 :]
                snaps = self._take_snapshots(batch)
                try:
                    async with self._turns:
                        await trio.to_thread.run_sync(self._commit, batch, snaps)
                except trio.Cancelled:
                    # cancelled before the commit started (once it runs, it finishes): the rows go
                    # back to the queue, and the ``finally`` below commits them
                    self._pending[:0] = batch
                    self._snapshots[:0] = snaps
                    raise
                except sqlite3.OperationalError as e:
                    # busy or a transient I/O error: nothing was written; keep the batch and retry
                    self._pending[:0] = batch
                    self._snapshots[:0] = snaps
                    self.commit_failures += 1
                    log.warning("commit of %d events failed (%s); retrying", len(batch), e)
                    await trio.sleep(min(1.0, 0.01 * 2 ** min(self.commit_failures, 7)))
                    continue
                if batch:
                    self._mark_committed(batch[-1][0])
        finally:
            with trio.CancelScope(shield=True):
                if (self._pending or self._snapshots) and not self.closed:
                    self._commit_rest()
            self.running = False
            self._committed.set()

    async def transact(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(connection, *args)`` in a worker thread, between two commits."""
        async with self._turns:
            return await trio.to_thread.run_sync(fn, self._conn, *args)

    def close(self) -> None:
        """Commit what is queued and close the file (synchronously)."""
        if self.closed:
            return
        if self._pending or self._snapshots:
            batch, self._pending = self._pending, []
            self._commit(batch, self._take_snapshots(batch))
            if batch:
                self.committed_seq = batch[-1][0]
        self._conn.close()
        self.closed = True
        self._lock.release()
