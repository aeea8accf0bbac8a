"""Check a damaged event log, and recover every readable event of it into a fresh one.

``check(path)`` is read-only and safe while a server writes the file (it reads as a WAL reader).
It says what is wrong in sentences a person can act on: SQLite's integrity check, the log's
schema version, the events (count, gaps, rows that do not decode, rows of a newer Modelium),
the snapshots, and whether a server holds the file.

``recover(path)`` writes a fresh, valid log that holds every event it can read, in seq order,
and (without ``out``) puts it in place of ``path``; the damaged original and its ``-wal``/``-shm``
are moved beside it as ``<path>.damaged-<time>``, never deleted. Snapshots are not carried over:
the next start folds the events. Events are read two ways and merged by seq:

* SQL, a window of seqs at a time; a window that fails is split in halves down to single seqs,
  so one bad page costs only its own rows;
* a page scan of the file as SQLite would see it (the main file overlaid with the committed
  frames of its WAL; pages on the free list are skipped). Damage to an interior page of the
  b-tree hides whole intact leaf pages from SQL; the scan still reads them. It reads the table
  b-tree leaf pages itself (https://www.sqlite.org/fileformat2.html), overflow chains included,
  and takes the cells that are rows of the ``events`` table whose body decodes and agrees with
  the row's ``ts``, ``type`` and ``model`` columns.

A row that SQL reads wins over the scan's (SQL sees the live b-tree); a row that decodes wins
over one that does not. Nothing is invented: every event kept is a row that was in the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import sqlite3
import struct
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelium.core.messages import Event, UnknownEvent, event_model
from storage.codec import decode_row
from storage.errors import LogError
from storage.logfile import EVENTS_SCHEMA, SCHEMA_VERSION, SEQ_FLOOR_KEY, SNAPSHOTS_SCHEMA
from storage.snapshot import decode_state, state_schema

WINDOW = 2048  # seqs per SQL query
MAX_PAYLOAD = 1 << 30  # larger than any row SQLite writes (SQLITE_MAX_LENGTH is 1e9)
_SQL_FAILURE_BUDGET = 100_000  # failing single-seq queries before the SQL pass gives up bisecting
_REQUEST_TYPES = ("RequestArrived", "RequestFinished")


# ============================================================================================
# Reports
# ============================================================================================


def _ranges(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted ints -> inclusive ranges."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def _fmt_ranges(ranges: list[tuple[int, int]], limit: int = 8) -> str:
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"and {len(ranges) - limit} more")
    return ", ".join(parts)


def _fmt_seqs(seqs: list[int], limit: int = 12) -> str:
    return _fmt_ranges(_ranges(sorted(seqs)), limit)


def _n(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _count(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a + 1 for a, b in ranges)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v) if isinstance(v, Path) else v


@dataclass
class CheckReport:
    path: Path
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)  # missing seq ranges (compacted ones too)
    compacted: int = 0  # missing seqs that retention rolled up (accounted for by RequestsRolledUp rows)
    undecodable: list[int] = field(default_factory=list)
    unknown: int = 0  # rows of an event type or version this Modelium does not know
    snapshots: int = 0
    usable_snapshots: int = 0
    schema_version: int | None = None
    integrity: str = ""
    sql_unreadable: list[tuple[int, int]] = field(default_factory=list)  # seq ranges SQL failed on
    scan_only: int = 0  # events only the page scan finds (recover keeps them)
    server_pid: str | None = None  # a server holds the file's lock
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = "ok" if self.ok else f"{len(self.problems)} problem{'s' * (len(self.problems) != 1)}"
        lines = [f"{self.path}: {head}"]
        lines.append(f"  integrity: {_first_lines(self.integrity)}")
        if self.schema_version is None:
            lines.append("  schema: unknown (no readable schema_version)")
        else:
            newer = " (NEWER than this Modelium)" if self.schema_version > SCHEMA_VERSION else ""
            lines.append(f"  schema: {self.schema_version}, this Modelium reads up to {SCHEMA_VERSION}{newer}")
        span = f" (seq {self.first_seq}..{self.last_seq})" if self.events else ""
        missing = _count(self.gaps)
        gap = f", {missing} missing in {len(self.gaps)} gap{'s' * (len(self.gaps) != 1)}" if self.gaps else ""
        if self.compacted:
            gap += f" ({self.compacted} of them rolled up by retention)"
        lines.append(f"  events: {self.events}{span}{gap}, {len(self.undecodable)} undecodable, "
                     f"{self.unknown} of a newer Modelium")
        if self.scan_only:
            lines.append(f"  page scan: {self.scan_only} more events that SQL cannot reach")
        lines.append(f"  snapshots: {self.snapshots} ({self.usable_snapshots} usable by this Modelium)")
        if self.server_pid is not None:
            lines.append(f"  server: pid {self.server_pid} holds the log (this check read it as a reader)")
        lines += [f"  note: {n}" for n in self.notes]
        if self.problems:
            lines.append("problems:")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class RecoverReport:
    source: Path
    output: Path | None = None
    ok: bool = False  # a valid log was written and no event was lost
    backup: Path | None = None  # where the damaged original was moved (None with ``out``)
    kept: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    max_seq_seen: int = 0  # the highest seq any source says existed (rows, snapshots, rollups)
    lost: list[tuple[int, int]] = field(default_factory=list)  # seq ranges in 1..max_seq_seen not kept
    undecodable: list[int] = field(default_factory=list)  # seqs whose rows were found but dropped
    compacted: int = 0  # seqs missing because retention rolled them up (not lost)
    unaccounted: int = 0  # seqs missing inside rolled-up ranges beyond what the rollups account for (lost)
    from_scan: int = 0  # events that only the page scan found
    snapshots_dropped: int = 0
    notes: list[str] = field(default_factory=list)  # how the events were read

    def summary(self) -> str:
        span = f" (seq {self.first_seq}..{self.last_seq})" if self.kept else ""
        where = "in place" if self.output == self.source else f"into {self.output}"
        lines = [f"recovered {self.source} {where}: kept {self.kept} events{span}"]
        if self.lost:
            lines.append(f"  LOST {_count(self.lost)} events of seq 1..{self.max_seq_seen}: "
                         f"{_fmt_ranges(self.lost)}")
        if self.unaccounted:
            lines.append(f"  LOST {self.unaccounted} more seqs inside ranges that retention rolled up (which ones "
                         "cannot be told)")
        if not self.lost and not self.unaccounted:
            lines.append(f"  no event of seq 1..{self.max_seq_seen} lost by this recovery")
        if self.undecodable:
            lines.append(f"  dropped {_n(len(self.undecodable), 'row')} that do not decode: "
                         f"{_fmt_seqs(self.undecodable)}")
        if self.compacted:
            lines.append(f"  {self.compacted} seqs were rolled up by retention before (not lost)")
        if self.from_scan:
            lines.append(f"  {_n(self.from_scan, 'event')} read by the page scan (SQL could not reach them)")
        if self.snapshots_dropped:
            lines.append(f"  {_n(self.snapshots_dropped, 'snapshot')} not carried over (the next start folds "
                         "the events)")
        if self.backup is not None:
            lines.append(f"  the damaged original is kept at {self.backup}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _first_lines(text: str, n: int = 3) -> str:
    lines = text.splitlines() or [""]
    more = f" ... ({len(lines) - n} more lines)" if len(lines) > n else ""
    return "; ".join(lines[:n]) + more


# ============================================================================================
# The SQLite file format: pages, cells, records
# ============================================================================================

_MAGIC = b"SQLite format 3\x00"
_WAL_MAGIC = (0x377F0682, 0x377F0683)


def _u16(b, i: int) -> int:
    return (b[i] << 8) | b[i + 1]


def _u32(b, i: int) -> int:
    return struct.unpack_from(">I", b, i)[0]


def _varint(b, i: int) -> tuple[int, int]:
    v = 0
    for k in range(8):
        c = b[i + k]
        v = (v << 7) | (c & 0x7F)
        if c < 0x80:
            return v, i + k + 1
    return (v << 8) | b[i + 8], i + 9


def local_payload(p: int, usable: int) -> int:
    """Bytes of a table-leaf cell's payload stored on the page itself (the rest overflows)."""
    x = usable - 35
    if p <= x:
        return p
    m = ((usable - 12) * 32 // 255) - 23
    k = m + ((p - m) % (usable - 4))
    return k if k <= x else m


_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def parse_record(payload: bytes) -> list | None:
    """The column values of a record, or None when the bytes are not exactly one record."""
    try:
        hsize, i = _varint(payload, 0)
        if hsize < 1 or hsize > len(payload):
            return None
        types = []
        while i < hsize:
            t, i = _varint(payload, i)
            types.append(t)
        if i != hsize:
            return None
        values: list = []
        off = hsize
        for t in types:
            if t == 0:
                values.append(None)
                continue
            if t in _INT_SIZES:
                n = _INT_SIZES[t]
                if off + n > len(payload):
                    return None
                values.append(int.from_bytes(payload[off:off + n], "big", signed=True))
                off += n
            elif t == 7:
                if off + 8 > len(payload):
                    return None
                values.append(struct.unpack_from(">d", payload, off)[0])
                off += 8
            elif t in (8, 9):
                values.append(t - 8)
            elif t >= 12:
                n = (t - 12) // 2
                if off + n > len(payload):
                    return None
                raw = bytes(payload[off:off + n])
                if t % 2 == 0:
                    values.append(raw)
                else:
                    try:
                        values.append(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        return None
                off += n
            else:
                return None  # 10 and 11 are reserved
        if off != len(payload):
            return None
        return values
    except IndexError:
        return None


@dataclass
class Cell:
    """A table b-tree leaf cell read by the page scan."""

    page: int  # the leaf page
    rowid: int
    values: list | None  # None: the payload is not a record (damaged)
    pages: tuple[int, ...]  # the leaf page then its overflow pages
    wal: bool  # the page image came from the WAL


class PageImage:
    """The pages of a log file as SQLite would see them: the main file overlaid with the
    committed frames of its ``-wal`` (the latest frame of a page wins)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.notes: list[str] = []
        self._files = []
        self.main = self._map(self.path)
        wal_path = Path(str(self.path) + "-wal")
        self.wal = self._map(wal_path) if wal_path.exists() else b""
        self.header_ok = self.main[:16] == _MAGIC
        self.page_size, self.reserved = self._geometry()
        self.usable = self.page_size - self.reserved if self.page_size else 0
        self.frames: dict[int, int] = {}  # page -> offset of its latest committed image in the WAL
        self.wal_db_pages = 0
        if self.wal and self.page_size:
            self._read_wal()
        main_pages = len(self.main) // self.page_size if self.page_size else 0
        self.npages = max([main_pages, *self.frames]) if self.page_size else 0
        if self.wal_db_pages:
            self.npages = max(self.npages, self.wal_db_pages)
        self.freelist = self._freelist()
        # the size the file should have: the last commit in the WAL says, else the header does
        # (when its "version valid for" matches its change counter)
        self.expected_pages = self.wal_db_pages
        if not self.expected_pages and self.header_ok and len(self.main) >= 100 and \
                _u32(self.main, 24) == _u32(self.main, 92):
            self.expected_pages = _u32(self.main, 28)
        self.main_pages = main_pages
        self.missing_pages = sum(1 for p in range(main_pages + 1, self.expected_pages + 1) if p not in self.frames)
        if self.missing_pages:
            self.notes.append(f"{self.missing_pages} of the log's {self.expected_pages} pages are missing: "
                              "the file was truncated")

    def _map(self, p: Path):
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return b""
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._files.append(m)
        return m

    def close(self) -> None:
        for m in self._files:
            with contextlib.suppress(BufferError):
                m.close()
        self._files = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- geometry

    def _geometry(self) -> tuple[int, int]:
        if self.header_ok and len(self.main) >= 100:
            ps = _u16(self.main, 16)
            ps = 65536 if ps == 1 else ps
            if ps >= 512 and ps & (ps - 1) == 0:
                return ps, self.main[20]
        if len(self.wal) >= 32 and _u32(self.wal, 0) in _WAL_MAGIC:
            ps = _u32(self.wal, 8)
            if 512 <= ps <= 65536 and ps & (ps - 1) == 0:
                self.notes.append(f"the file's header is damaged; page size {ps} taken from the WAL")
                return ps, 0
        # guess: the page size under which the most pages look like b-tree pages
        best, best_n = 0, 0
        for ps in (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512):
            n = sum(1 for off in range(ps, len(self.main) - ps + 1, ps) if self._looks_btree(self.main, off, ps))
            if n > best_n:
                best, best_n = ps, n
        if best:
            self.notes.append(f"the file's header is damaged; page size {best} guessed from its pages")
        return best, 0

    @staticmethod
    def _looks_btree(b, off: int, ps: int) -> bool:
        t = b[off]
        if t not in (2, 5, 10, 13):
            return False
        hdr = 8 if t in (10, 13) else 12
        n = _u16(b, off + 3)
        start = _u16(b, off + 5) or 65536
        return 0 < n and hdr + 2 * n <= start <= ps

    def _read_wal(self) -> None:
        wal, ps = self.wal, self.page_size
        if len(wal) < 32 or _u32(wal, 0) not in _WAL_MAGIC:
            self.notes.append("the -wal file has no valid header; its frames were not read")
            return
        big = _u32(wal, 0) & 1
        if _u32(wal, 8) != ps:
            self.notes.append("the -wal file's page size differs from the database's; its frames were not read")
            return
        salts = bytes(wal[16:24])
        s = _wal_checksum(wal, 0, 24, big, 0, 0)
        if s != (_u32(wal, 24), _u32(wal, 28)):
            self.notes.append("the -wal file's header fails its checksum; its frames were not read")
            return
        # As SQLite does: the frames of this generation of the WAL (its salts) whose cumulative
        # checksums hold, up to the last commit frame. Frames after it are a transaction that never
        # committed, or the leftovers of one that SQLite rolled back and overwrote in part.
        frames, last_commit = [], -1
        off = 32
        while off + 24 + ps <= len(wal):
            if bytes(wal[off + 8:off + 16]) != salts:
                break
            s = _wal_checksum(wal, off, 8, big, *s)
            s = _wal_checksum(wal, off + 24, ps, big, *s)
            if s != (_u32(wal, off + 16), _u32(wal, off + 20)):
                break
            pgno, commit = _u32(wal, off), _u32(wal, off + 4)
            frames.append((pgno, off + 24))
            if commit:
                last_commit = len(frames) - 1
                self.wal_db_pages = commit
            off += 24 + ps
        for pgno, data_off in frames[: last_commit + 1]:
            self.frames[pgno] = data_off
        ignored = (len(wal) - 32) // (24 + ps) - (last_commit + 1)
        if ignored:
            self.notes.append(f"{_n(ignored, 'WAL frame')} past the last valid commit were not read "
                              "(never committed, or damaged)")

    # ---------------------------------------------------------------- pages

    def page(self, pgno: int):
        """The image of page ``pgno`` (1-based) or None when the file does not hold it."""
        ps = self.page_size
        if not ps or pgno < 1:
            return None
        off = self.frames.get(pgno)
        if off is not None:
            return memoryview(self.wal)[off:off + ps]
        start = (pgno - 1) * ps
        if start + ps > len(self.main):
            return None
        return memoryview(self.main)[start:start + ps]

    def in_wal(self, pgno: int) -> bool:
        return pgno in self.frames

    def _freelist(self) -> set[int]:
        p1 = self.page(1)
        if p1 is None or bytes(p1[:16]) != _MAGIC:
            if self.page_size:
                self.notes.append("page 1 is damaged: pages on the free list could not be told apart")
            return set()
        trunk, total = _u32(p1, 32), _u32(p1, 36)
        free: set[int] = set()
        per_trunk = (self.usable - 8) // 4
        while trunk:
            if trunk > self.npages or trunk in free or len(free) > total:
                self.notes.append("the free list is damaged: pages on it could not all be told apart")
                return free
            free.add(trunk)
            page = self.page(trunk)
            if page is None:
                break
            n = _u32(page, 4)
            if n > per_trunk:
                self.notes.append("the free list is damaged: pages on it could not all be told apart")
                return free
            for i in range(n):
                leaf = _u32(page, 8 + 4 * i)
                if 1 <= leaf <= self.npages:
                    free.add(leaf)
            trunk = _u32(page, 0)
        return free

    def page_type(self, pgno: int) -> int | None:
        page = self.page(pgno)
        if page is None:
            return None
        return page[100 if pgno == 1 else 0]

    def cells(self) -> Iterator[Cell]:
        """Every cell of every table b-tree leaf page that is not on the free list."""
        for pgno in range(1, self.npages + 1):
            if pgno in self.freelist:
                continue
            page = self.page(pgno)
            if page is None:
                continue
            yield from self._leaf_cells(pgno, page)

    def _leaf_cells(self, pgno: int, page) -> Iterator[Cell]:
        h = 100 if pgno == 1 else 0
        u = self.usable
        if page[h] != 13:
            return
        n = _u16(page, h + 3)
        ptrs_end = h + 8 + 2 * n
        if ptrs_end > u:
            return
        wal = self.in_wal(pgno)
        for i in range(n):
            ptr = _u16(page, h + 8 + 2 * i)
            if ptr < ptrs_end or ptr >= u:
                continue
            try:
                size, j = _varint(page, ptr)
                rowid, j = _varint(page, j)
            except IndexError:
                continue
            if rowid >= 1 << 63:
                rowid -= 1 << 64
            if size > MAX_PAYLOAD:
                continue
            local = local_payload(size, u)
            if j + local > u:
                continue
            payload = bytes(page[j:j + local])
            pages: tuple[int, ...] = (pgno,)
            if size > local:
                if j + local + 4 > u:
                    continue
                rest = self._overflow(_u32(page, j + local), size - local)
                if rest is None:
                    yield Cell(pgno, rowid, None, pages, wal)
                    continue
                data, chain = rest
                payload += data
                pages += chain
            yield Cell(pgno, rowid, parse_record(payload), pages, wal)

    def _overflow(self, first: int, need: int) -> tuple[bytes, tuple[int, ...]] | None:
        u = self.usable
        out, chain = [], []
        pgno = first
        while need > 0:
            if not 1 <= pgno <= self.npages or pgno in chain or pgno in self.freelist:
                return None
            page = self.page(pgno)
            if page is None:
                return None
            take = min(u - 4, need)
            out.append(bytes(page[4:4 + take]))
            chain.append(pgno)
            need -= take
            pgno = _u32(page, 0)
        return b"".join(out), tuple(chain)


def _wal_checksum(b, off: int, n: int, big: int, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack_from(f"{'>' if big else '<'}{n // 4}I", b, off)
    m = 0xFFFFFFFF
    for k in range(0, len(words), 2):
        s0 = (s0 + words[k] + s1) & m
        s1 = (s1 + words[k + 1] + s0) & m
    return s0, s1


# ============================================================================================
# Reading rows
# ============================================================================================


def _decode(ts, type_name, model, v, body) -> tuple[Event | None, str]:
    """A stored row -> (event, "") or (None, why it is not an event)."""
    if not (isinstance(type_name, str) and isinstance(v, int) and isinstance(ts, (int, float))
            and isinstance(body, bytes) and (model is None or isinstance(model, str))):
        return None, "its columns have the wrong types"
    try:
        event = decode_row(type_name, v, body)
    except Exception as e:  # noqa: BLE001 - a damaged body may fail in any way
        return None, f"its body does not decode ({e})"
    if not isinstance(event, UnknownEvent):
        if type(event).__name__ != type_name:
            return None, f"its body is a {type(event).__name__}, its type column says {type_name}"
        if event.ts != float(ts) or event_model(event) != model:
            return None, "its body disagrees with its ts/model columns"
    return event, ""


def event_values(values: list | None) -> tuple | None:
    """(ts, type, model, v, body) when a scanned record has the shape of an events row."""
    if values is None or len(values) != 6 or values[0] is not None:
        return None
    ts, type_name, model, v, body = values[1:]
    if (isinstance(ts, (int, float)) and isinstance(type_name, str) and (model is None or isinstance(model, str))
            and isinstance(v, int) and isinstance(body, bytes)):
        return float(ts), type_name, model, v, body
    return None


def _snapshot_values(values: list | None) -> tuple | None:
    if values is None or len(values) != 4 or values[0] is not None:
        return None
    schema, created, body = values[1:]
    if isinstance(schema, str) and isinstance(created, (int, float)) and isinstance(body, bytes):
        return schema, body
    return None


class _Collector:
    """What the page scan and SQL found, merged by seq."""

    def __init__(self):
        self.scan_ok: dict[int, tuple] = {}  # seq -> (ts, type, model, v, body), decodable
        self.scan_bad: dict[int, str] = {}  # seq -> why (a row was there, it does not decode)
        self.scan_conflicts = 0
        self.snapshots: dict[int, tuple[str, bytes]] = {}  # seq -> (schema, body), from the scan
        self.meta: dict[str, str] = {}
        self.rollups: dict[int, Event] = {}  # seq -> RequestsRolledUp (any source)
        self.unknown: set[int] = set()
        self.missing_pages = 0

    def scan(self, image: PageImage) -> None:
        self.missing_pages = image.missing_pages
        for cell in image.cells():
            if cell.rowid < 1:
                continue
            vals = cell.values
            row = event_values(vals)
            if row is not None:
                seq = cell.rowid
                event, why = _decode(*row)
                if event is None:
                    self.scan_bad.setdefault(seq, why)
                    continue
                old = self.scan_ok.get(seq)
                if old is not None and old != row:
                    self.scan_conflicts += 1
                    # retention replaces request rows by a rollup at the same seq: the rollup is newer
                    if old[1] == "RequestsRolledUp" or row[1] != "RequestsRolledUp":
                        continue
                self.scan_ok[seq] = row
                self._note(seq, event)
                continue
            snap = _snapshot_values(vals)
            if snap is not None:
                self.snapshots.setdefault(cell.rowid, snap)
                continue
            if vals is not None and len(vals) == 2 and all(isinstance(x, str) for x in vals):
                self.meta.setdefault(vals[0], vals[1])

    def _note(self, seq: int, event: Event) -> None:
        if isinstance(event, UnknownEvent):
            self.unknown.add(seq)
        elif type(event).__name__ == "RequestsRolledUp":
            self.rollups[seq] = event

    def known_seqs(self) -> list[int]:
        return sorted(self.scan_ok.keys() | self.scan_bad.keys())


def _sql_rows(conn: sqlite3.Connection, top: int, known: list[int] | None,
              failed: list[tuple[int, int]]) -> Iterator[tuple]:
    """``(seq, ts, type, model, v, body)`` of the events table by SQL, in seq order, a window of
    seqs at a time up to ``top``, then on until SQL has no more. A window that fails is split in
    halves down to single seqs (so a bad page costs only its rows); a failing range in which the
    page scan (``known``) saw no row is given up whole. Ranges SQL could not read go to ``failed``."""
    budget = [_SQL_FAILURE_BUDGET]
    # (seq >= lo + 1 seeks straight to lo + 1; seq > lo may step in from lo's side of a damaged page)
    q = "SELECT seq, ts, type, model, v, body FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq"

    def has_known(lo: int, hi: int) -> bool:
        return known is None or bisect_right(known, hi) > bisect_left(known, lo + 1)

    def window(lo: int, hi: int) -> list[tuple]:
        try:
            return conn.execute(q, (lo + 1, hi)).fetchall()
        except sqlite3.DatabaseError:
            pass
        if hi - lo == 1 or not has_known(lo, hi) or budget[0] <= 0:
            budget[0] -= 1
            failed.append((lo + 1, hi))
            return []
        mid = (lo + hi) // 2
        return window(lo, mid) + window(mid, hi)

    last = lo = 0
    while lo < top:
        hi = min(lo + WINDOW, top)
        for row in window(lo, hi):
            # a damaged interior page can send SQLite to the wrong leaf: keep only what is in order
            if isinstance(row[0], int) and lo < row[0] <= hi and row[0] > last:
                last = row[0]
                yield row
        lo = hi
    while True:  # past the highest seq anyone knew of
        try:
            rows = conn.execute("SELECT seq, ts, type, model, v, body FROM events WHERE seq >= ? "
                                "ORDER BY seq LIMIT ?", (lo + 1, WINDOW)).fetchall()
        except sqlite3.DatabaseError:
            return  # the damage that ends the file: the page scan read what is left
        rows = [r for r in rows if isinstance(r[0], int) and r[0] > lo]
        if not rows:
            return
        for row in rows:
            if row[0] > last:
                last = row[0]
                yield row
        lo = last


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of inclusive ranges, sorted and coalesced."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _minus(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ``ranges`` without the seqs in ``holes``."""
    out: list[tuple[int, int]] = []
    holes = _merge(holes)
    for a, b in _merge(ranges):
        for ha, hb in holes:
            if hb < a or ha > b:
                continue
            if ha > a:
                out.append((a, ha - 1))
            a = hb + 1
            if a > b:
                break
        if a <= b:
            out.append((a, b))
    return out


def _ro_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    # a file shorter than its header says (truncated) is refused whole unless the schema is
    # "writable": then SQLite reads up to the damage (the connection is read-only all the same)
    conn.execute("PRAGMA writable_schema=ON")
    return conn


def _sql_meta(conn: sqlite3.Connection) -> dict[str, str] | None:
    try:
        return {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    except sqlite3.DatabaseError:
        return None


def _sql_tables(conn: sqlite3.Connection) -> set[str] | None:
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError:
        return None


def _sql_max_seq(conn: sqlite3.Connection) -> int:
    try:
        return conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        return 0


def _sql_snapshots(conn: sqlite3.Connection) -> dict[int, tuple[str, bytes]] | None:
    try:
        return {seq: (schema, body) for seq, schema, body in conn.execute("SELECT seq, schema, body FROM snapshots")}
    except sqlite3.DatabaseError:
        return None


def _usable(schema, body) -> bool:
    if schema != state_schema() or not isinstance(body, bytes):
        return False
    try:
        decode_state(body)
        return True
    except Exception:  # noqa: BLE001
        return False


def _schema_version(meta: dict[str, str]) -> int | None:
    try:
        return int(meta["schema_version"])
    except (KeyError, ValueError):
        return None


LOST_KEY = "recovery_lost"  # meta: JSON [[first, last], ...] of the seq ranges earlier recoveries lost


def _lost_on_record(meta: dict[str, str]) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in json.loads(meta.get(LOST_KEY) or "[]")]
    except (ValueError, TypeError):
        return []


def _rollup_items(e) -> int:
    return e.arrivals + e.ok + e.error + e.timeout + e.rejected + e.cancelled


def _compaction(missing: list[tuple[int, int]], rollups: dict[int, Event]) -> tuple[int, list[tuple[int, int]], int]:
    """Split missing seq ranges into what retention rolled up and what is lost.

    A ``RequestsRolledUp`` at seq s replaced ``items`` request rows in ``first_seq..last_seq``
    (s is one of them). Missing seqs inside those ranges are compacted up to the number the
    rollups account for; returns (compacted, lost ranges outside them, unaccounted: missing seqs
    inside them beyond that number, which damage took but which cannot be told apart)."""
    if not rollups:
        return 0, missing, 0
    cover = _merge([(e.first_seq, e.last_seq) for e in rollups.values()])
    starts = [a for a, _ in cover]
    inside: list[tuple[int, int]] = []
    outside: list[tuple[int, int]] = []
    for a, b in missing:
        s = a
        while s <= b:
            i = bisect_right(starts, s) - 1
            if i >= 0 and cover[i][0] <= s <= cover[i][1]:
                e = min(b, cover[i][1])
                inside.append((s, e))
            else:
                e = min(b, starts[i + 1] - 1) if i + 1 < len(starts) else b
                outside.append((s, e))
            s = e + 1
    expected = sum(_rollup_items(e) - 1 for e in rollups.values())
    n_inside = _count(inside)
    return min(n_inside, expected), outside, max(0, n_inside - expected)


# ============================================================================================
# The lock
# ============================================================================================


def _lock_holder(path: Path) -> str | None:
    """The pid written in ``<path>.lock`` when a server holds it; None when it is free."""
    lock_path = Path(str(path) + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def _hold_lock(path: Path):
    """Hold ``<path>.lock`` (as a server does) so that no server opens the log while we work."""
    lock_path = Path(str(path) + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LogError(f"cannot open the lock file {lock_path}: {e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise LogError(f"{path} is in use by a Modelium server (pid {holder}); stop it before "
                           "`modelium db recover` (`modelium db check` works while it runs)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)  # what a server that tries to start is told
        yield
    finally:
        os.close(fd)


# ============================================================================================
# Reading every readable event: the page scan, then SQL, merged by seq
# ============================================================================================


def _link(src: Path, dst: Path) -> None:
    """A second name for ``src``; a copy where the file system has no hard links. Never
    overwrites ``dst``."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        with open(src, "rb") as f, open(dst, "xb") as g:
            shutil.copyfileobj(f, g, 1 << 20)
            g.flush()
            os.fsync(g.fileno())


@dataclass
class _Gathered:
    kept: set[int] = field(default_factory=set)  # seqs of the events kept (SQL's and the scan's)
    from_scan: int = 0
    undecodable: dict[int, str] = field(default_factory=dict)  # seq -> why; no decodable row of it
    unknown: set[int] = field(default_factory=set)
    rollups: dict[int, Event] = field(default_factory=dict)
    snapshots: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    sql_failed: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sql_max: int = 0


def _gather(conn: sqlite3.Connection, collector: _Collector | None, sink=None) -> _Gathered:
    """Read the events by SQL (and take the scan's rows where SQL has none): ``sink(rows)`` gets
    every kept row as ``(seq, ts, type, model, v, body)``, SQL's in seq order, then the scan's."""
    g = _Gathered()
    known = collector.known_seqs() if collector is not None else None
    g.sql_max = _sql_max_seq(conn)
    top = max([g.sql_max, *(known or [])[-1:]])
    batch: list[tuple] = []
    for seq, ts, type_name, model, v, body in _sql_rows(conn, top, known or None, g.sql_failed):
        event, why = _decode(ts, type_name, model, v, body)
        if event is None:
            g.undecodable[seq] = why
            continue
        g.kept.add(seq)
        if isinstance(event, UnknownEvent):
            g.unknown.add(seq)
        elif type(event).__name__ == "RequestsRolledUp":
            g.rollups[seq] = event
        if sink is not None:
            batch.append((seq, float(ts), type_name, model, v, body))
            if len(batch) >= 4096:
                sink(batch)
                batch = []
    if sink is not None and batch:
        sink(batch)
    g.sql_failed = _merge(g.sql_failed)
    if g.sql_failed:
        g.notes.append(f"SQL could not read seqs {_fmt_ranges(g.sql_failed)}; the page scan read what it could")
    if collector is None:
        return g

    # the scan's rows where SQL had none, or had one that does not decode
    g.rollups.update({s: e for s, e in collector.rollups.items() if s not in g.kept})
    cover = _merge([(e.first_seq, e.last_seq) for e in g.rollups.values()])
    starts = [a for a, _ in cover]
    minutes = {(e.model, e.minute) for e in g.rollups.values()}
    extra, compacted = [], 0
    for seq in sorted(collector.scan_ok):
        if seq in g.kept:
            continue
        ts, type_name, model, v, body = row = collector.scan_ok[seq]
        if type_name in _REQUEST_TYPES and (model, ts - ts % 60.0) in minutes:
            i = bisect_right(starts, seq) - 1
            if i >= 0 and cover[i][0] <= seq <= cover[i][1]:
                # a request row that retention rolled up, left on a page that SQL no longer uses
                compacted += 1
                continue
        extra.append((seq, *row))
        g.undecodable.pop(seq, None)
        if seq in collector.unknown:
            g.unknown.add(seq)
    if compacted:
        g.notes.append(f"{compacted} request events found by the page scan were already rolled up by retention; "
                       "they were not kept")
    if collector.scan_conflicts:
        g.notes.append(f"{collector.scan_conflicts} seqs were found on two pages with different rows")
    g.kept.update(x[0] for x in extra)
    g.from_scan = len(extra)
    if sink is not None:
        for i in range(0, len(extra), 4096):
            sink(extra[i:i + 4096])
    for seq, why in collector.scan_bad.items():
        if seq not in g.kept:
            g.undecodable.setdefault(seq, why)
    return g


def _accounting(g: _Gathered):
    """(first, last, max seq seen, missing ranges, lost ranges, compacted, unaccounted).

    Missing: seqs in 1..max seen with no row at all (an undecodable row is not missing). The
    highest seq seen is the highest of the rows, the snapshots (a snapshot at seq s commits with
    the events up to s) and the rollups' ranges."""
    present = sorted(g.kept | g.undecodable.keys())
    top = max([*present[-1:], g.sql_max, *g.snapshots, *(e.last_seq for e in g.rollups.values()), 0])
    missing: list[tuple[int, int]] = []
    prev = 0
    for s in present:
        if s > prev + 1:
            missing.append((prev + 1, s - 1))
        prev = s
    if top > prev:
        missing.append((prev + 1, top))
    compacted, lost, unaccounted = _compaction(missing, g.rollups)
    kept = sorted(g.kept)
    return (kept[0] if kept else None), (kept[-1] if kept else None), top, missing, lost, compacted, unaccounted


# ============================================================================================
# check
# ============================================================================================


def check(path: str | Path) -> CheckReport:
    """What is wrong with the log at ``path`` (read-only; safe while a server writes it).

    Never raises for a damaged file (the report's problems say what is wrong); LogError only
    when there is no file at ``path``."""
    path = Path(path)
    if not path.exists():
        raise LogError(f"no event log at {path}")
    r = CheckReport(path=path)
    r.server_pid = _lock_holder(path)
    if not path.is_file():
        r.problems.append(f"{path} is not a file")
        return r
    try:
        _check(path, r)
    except Exception as e:  # noqa: BLE001 - a check never raises for a damaged file
        r.problems.append(f"the check stopped early ({type(e).__name__}: {e}); "
                          f"`modelium db recover {path}` keeps every readable event")
    r.ok = not r.problems
    return r


def _check(path: Path, r: CheckReport) -> None:
    hint = f"`modelium db recover {path}` keeps every readable event"
    collector: _Collector | None = None

    def scan() -> _Collector:
        nonlocal collector
        if collector is None:
            collector = _scan_pages(path, r.notes)
        return collector

    conn = _ro_connect(path)
    try:
        conn.execute("BEGIN")  # one consistent view while a server writes
        try:
            r.integrity = "\n".join(str(x[0]) for x in conn.execute("PRAGMA integrity_check"))
        except sqlite3.DatabaseError as e:
            r.integrity = f"error: {e}"
        damaged = r.integrity != "ok"
        tables = _sql_tables(conn)
        meta = _sql_meta(conn)
        if meta is None or "schema_version" not in meta:
            meta = {**scan().meta, **(meta or {})}
        r.schema_version = _schema_version(meta)
        if r.schema_version is not None and r.schema_version > SCHEMA_VERSION:
            r.problems.append(
                f"{path} was written by a newer Modelium (log schema {r.schema_version}; this one reads up "
                f"to {SCHEMA_VERSION}): it is not damaged; use that Modelium or a newer one")
            return
        if tables is None or "events" not in tables:
            if not scan().scan_ok and not scan().scan_bad:
                what = (f"is not an SQLite database, or every page of it is damaged ({_first_lines(r.integrity, 1)})"
                        if tables is None else "holds no Modelium event log (no 'events' table)")
                r.problems.append(f"{path} {what}: no event can be read")
                return
            damaged = True
        if damaged:
            r.problems.append(f"SQLite's integrity check fails ({_first_lines(r.integrity, 2)}); {hint}")
        if r.schema_version is None:
            r.problems.append(f"the log has no readable schema_version; {hint} (it writes a new one)")

        g = _gather(conn, scan() if damaged else None)
        if g.sql_failed and collector is None:  # SQL met damage that the integrity check missed
            g = _gather(conn, scan())
        snaps = _sql_snapshots(conn)
        if snaps is None:
            snaps = scan().snapshots
            r.notes.append("SQL cannot read the snapshots table; they were counted by the page scan")
        g.snapshots = snaps
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("COMMIT")
        conn.close()

    r.first_seq, r.last_seq, _, r.gaps, lost, r.compacted, unaccounted = _accounting(g)
    r.events = len(g.kept)
    r.undecodable = sorted(g.undecodable)
    r.unknown = len(g.unknown)
    r.sql_unreadable = g.sql_failed
    r.scan_only = g.from_scan
    r.snapshots = len(snaps)
    r.usable_snapshots = sum(_usable(schema, body) for schema, body in snaps.values())
    r.notes.extend(g.notes)
    on_record = _lost_on_record(meta)
    if on_record:
        before = _count(lost)
        lost = _minus(lost, on_record)
        r.notes.append(f"{_n(before - _count(lost), 'event')} of seqs {_fmt_ranges(on_record)} were lost by "
                       f"an earlier recovery ({meta.get('recovered', 'date unknown')}), not by new damage")

    if collector is not None and collector.missing_pages:
        r.problems.append(f"the file is {_n(collector.missing_pages, 'page')} shorter than its header (or WAL) says: "
                          f"it was cut short (a full disk, an interrupted copy), and the events that were in the "
                          f"missing pages are lost; {hint}")
    if r.sql_unreadable:
        r.problems.append(f"SQL cannot read seqs {_fmt_ranges(r.sql_unreadable)} (damaged pages); {hint}")
    if r.scan_only:
        r.problems.append(f"a page scan finds {_n(r.scan_only, 'event')} that SQL cannot reach; {hint}")
    if r.undecodable:
        r.problems.append(f"events that do not decode: {len(r.undecodable)} (seqs {_fmt_seqs(r.undecodable)}); "
                          f"their rows are damaged; `modelium db recover {path}` drops them and keeps the rest")
    if lost:
        r.problems.append(f"events missing: {_count(lost)} (seqs {_fmt_ranges(lost)}); the log lost them, and "
                          "the registry rebuilt from it does not know what they said")
    if unaccounted:
        r.problems.append(f"{unaccounted} seqs inside ranges that retention rolled up are missing beyond what "
                          "the rollups account for")
    if r.unknown:
        r.notes.append(f"{r.unknown} events are of a type or version this Modelium does not know (a newer one "
                       "wrote them); they are kept, and the fold skips them")


# ============================================================================================
# recover
# ============================================================================================


def recover(path: str | Path, *, out: str | Path | None = None) -> RecoverReport:
    """Write every readable event of the log at ``path`` into a fresh log.

    Without ``out`` the fresh log replaces ``path`` and the original (with its -wal/-shm) is
    moved to ``<path>.damaged-<time>``; with ``out`` it is written there and ``path`` is left
    alone. Refuses (LogError) while a server holds the log, when ``out`` exists, and for a log
    written by a newer Modelium."""
    path = Path(path)
    if not path.exists():
        raise LogError(f"no event log at {path}")
    if not path.is_file():
        raise LogError(f"{path} is not a file")
    target = Path(out) if out is not None else path
    if out is not None:
        for p in (target, Path(f"{target}-wal")):
            if p.exists():
                raise LogError(f"{p} exists; `modelium db recover --out` writes a new file only "
                               "(remove it or choose another name)")
        if not target.parent.is_dir():
            raise LogError(f"no folder {target.parent} to write {target} in")
    with _hold_lock(path):
        # a read-only SQLite connection makes an empty -wal and a -shm beside a log that has none;
        # no server runs (we hold the lock), so those that were not there before go again after
        made = [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if not p.exists()]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        tmp = target.with_name(f"{target.name}.recovering-{os.getpid()}")
        staging = target.with_name(f"{target.name}.staging-{os.getpid()}")
        try:
            report = _recover(path, tmp, staging)
            report.output = target
            if out is not None:
                _link(tmp, target)  # fails, rather than overwrites, if someone made target meanwhile
            else:
                report.backup = _swap(path, tmp, stamp)
            _fsync_dir(target.parent)
        except (sqlite3.Error, OSError) as e:
            raise LogError(f"recovering {path} failed ({e}); {path} was left as it was") from e
        finally:
            for p in (tmp, staging, Path(f"{tmp}-journal"), Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            for p in made:
                with contextlib.suppress(OSError):
                    if p.stat().st_size == 0 or p.name.endswith("-shm"):
                        p.unlink()
    return report


def _swap(path: Path, new: Path, stamp: str) -> Path:
    """Move the damaged original (and its -wal/-shm) aside, then put ``new`` in its place.

    The original is linked to its new name first, so that ``path`` names a file at every moment;
    its -wal goes aside before the new file arrives (an old WAL must never meet the new file)."""
    backup = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while any(Path(f"{backup}{s}").exists() for s in ("", "-wal", "-shm")):
        backup = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    _link(path, backup)
    moved = []
    try:
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{backup}{suffix}"))
                moved.append(suffix)
        os.replace(new, path)
    except OSError:
        for suffix in moved:
            os.replace(Path(f"{backup}{suffix}"), Path(f"{path}{suffix}"))
        os.unlink(backup)
        raise
    return backup


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _scan_pages(path: Path, notes: list[str]) -> _Collector:
    """The rows the page scan finds in ``path`` (and its WAL); what went wrong goes to ``notes``."""
    collector = _Collector()
    try:
        with PageImage(path) as image:
            collector.scan(image)
            notes.extend(image.notes)
    except (OSError, ValueError) as e:
        notes.append(f"the page scan could not read the file ({e})")
    return collector


def _recover(path: Path, tmp: Path, staging_path: Path) -> RecoverReport:
    report = RecoverReport(source=path)
    collector = _scan_pages(path, report.notes)

    conn = _ro_connect(path)
    staging = sqlite3.connect(staging_path, isolation_level=None)
    try:
        sql_meta = _sql_meta(conn)
        meta = {**collector.meta, **(sql_meta or {})}
        version = _schema_version(meta)
        if version is not None and version > SCHEMA_VERSION:
            raise LogError(f"{path} was written by a newer Modelium (log schema {version}; this one reads up "
                           f"to {SCHEMA_VERSION}): it is not damaged, and this Modelium does not rewrite it")
        tables = _sql_tables(conn)
        if (tables is None or "events" not in tables) and not collector.scan_ok and not collector.scan_bad:
            what = ("is not an SQLite database, or every page of it is damaged" if tables is None
                    else "holds no Modelium event log (no 'events' table)")
            raise LogError(f"{path} {what}: no event can be read; nothing was written")
        if sql_meta is None:
            report.notes.append("SQL cannot read the meta table; its rows were taken from the page scan")
        snaps = _sql_snapshots(conn)
        snaps = {**collector.snapshots, **(snaps or {})}

        staging.execute("PRAGMA journal_mode=OFF")
        staging.execute("PRAGMA synchronous=OFF")
        staging.execute("CREATE TABLE rows(seq INTEGER PRIMARY KEY, ts, type, model, v, body)")
        staging.execute("BEGIN")
        g = _gather(conn, collector,
                    lambda rows: staging.executemany("INSERT OR IGNORE INTO rows VALUES (?,?,?,?,?,?)", rows))
        staging.execute("COMMIT")
    finally:
        conn.close()
        staging.close()
    g.snapshots = snaps
    report.notes.extend(g.notes)
    report.snapshots_dropped = len(snaps)
    report.from_scan = g.from_scan
    report.undecodable = sorted(g.undecodable)
    if g.undecodable:
        why = "; ".join(f"seq {s}: {g.undecodable[s]}" for s in report.undecodable[:5])
        report.notes.append(f"rows dropped because they do not decode: {why}"
                            + (" ..." if len(g.undecodable) > 5 else ""))

    report.first_seq, report.last_seq, report.max_seq_seen, _, lost, report.compacted, report.unaccounted = \
        _accounting(g)
    report.lost = _merge(lost + _ranges(report.undecodable))  # an undecodable row is not recovered either
    earlier = _lost_on_record(meta)
    if earlier:
        before = _count(report.lost)
        report.lost = _minus(report.lost, earlier)
        if before > _count(report.lost):
            report.notes.append(f"{_n(before - _count(report.lost), 'event')} of seqs {_fmt_ranges(earlier)} were "
                                f"lost by an earlier recovery ({meta.get('recovered', 'date unknown')})")
    if collector.missing_pages:
        report.notes.append(f"events after seq {report.last_seq or 0} may be lost too: nothing left in the file "
                            "says whether there were any")

    # the fresh log: same schema, meta copied (or made), events in seq order, no snapshots
    if version is None:
        report.notes.append(f"the log's schema_version was not readable; the new log says {SCHEMA_VERSION}")
        meta["schema_version"] = str(SCHEMA_VERSION)
    meta.setdefault("created", str(time.time()))
    meta["recovered"] = f"{time.strftime('%Y-%m-%d %H:%M:%S')} from {path.name}"
    # the losses go on record, so that a later check tells them from new damage
    on_record = _merge(earlier + report.lost)
    if on_record:
        meta[LOST_KEY] = json.dumps(on_record)
    # seqs that existed must never be given to new events (triggers and subscribers name them)
    meta[SEQ_FLOOR_KEY] = str(max(report.max_seq_seen, int(meta.get(SEQ_FLOOR_KEY, 0) or 0)))
    new = sqlite3.connect(tmp, isolation_level=None)
    try:
        new.executescript(EVENTS_SCHEMA)
        new.executescript(SNAPSHOTS_SCHEMA)
        new.execute("ATTACH DATABASE ? AS staging", (str(staging_path),))
        new.execute("BEGIN")
        new.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", sorted(meta.items()))
        new.execute("INSERT INTO events(seq, ts, type, model, v, body) "
                    "SELECT seq, ts, type, model, v, body FROM staging.rows ORDER BY seq")
        new.execute("COMMIT")
        new.execute("DETACH DATABASE staging")
        report.kept = new.execute("SELECT count(*) FROM events").fetchone()[0]
        integrity = new.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            raise LogError(f"the recovered log fails SQLite's integrity check ({integrity}); nothing was replaced")
        new.execute("PRAGMA journal_mode=WAL")
    finally:
        new.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    report.ok = not report.lost and not report.unaccounted and not collector.missing_pages
    return report
