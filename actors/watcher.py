"""The watcher: scans the models folders and says what appeared, changed or went away.

Every ``interval_s`` it lists the model folders (stats only, in a thread), compares their
fingerprints with what it already reported, and analyses (in a thread) what is new or changed:
``ModelDiscovered`` / ``ModelChanged`` carry the analysed spec, ``ModelInvalid`` the reason,
``ModelRemoved`` a folder that vanished. A folder whose files changed less than ``settle_s`` ago
is still being copied and waits: a new or changed folder is taken once its newest file is older
than ``settle_s`` and its fingerprint did not move since the previous scan, or at once when it
holds a ``.modelium-ready`` marker file. (A copy that preserves old mtimes may still be caught
half-way; the analysis then says precisely what is incomplete, and the finished copy is analysed
again when its fingerprint changes.) What it already reported is rebuilt from the registry when it
starts, so a restart does not rediscover unchanged models.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import trio

from actors.base import Service
from modelium.core.analysis import AnalysisOptions, FolderState, Invalid, analyse, diff, scan_root
from modelium.core.messages import ModelChanged, ModelDiscovered, ModelInvalid, ModelRemoved
from storage.eventlog import EventLog
from storage.registry import State

log = logging.getLogger("modelium.watcher")

READY_MARKER = ".modelium-ready"  # a copy tool may create it last: the folder is taken at once


def scan_roots(roots: list[Path]) -> tuple[dict[str, FolderState], dict[str, Path]]:
    """All candidate folders of ``roots``; on a name clash the first root wins."""
    found: dict[str, FolderState] = {}
    root_of: dict[str, Path] = {}
    for root in roots:
        for name, st in scan_root(root).items():
            if name in found:
                log.warning("model %s in %s is hidden by the one in %s", name, root, root_of[name])
                continue
            found[name] = st
            root_of[name] = root
    return found, root_of


class Watcher(Service):
    name = "watcher"

    def __init__(self, log: EventLog, registry: State, roots: list[Path], *, interval_s: float = 2.0,
                 settle_s: float = 1.0, options: AnalysisOptions = AnalysisOptions()):
        super().__init__()
        self.log = log
        self.registry = registry
        self.roots = [Path(r) for r in roots]
        self.interval_s = interval_s
        self.settle_s = settle_s
        self.options = options
        self.known: dict[str, str] = {}
        self.seen: dict[str, str] = {}  # fingerprints of the previous scan (to tell a folder still changing)
        self.scans = 0

    async def on_start(self) -> None:
        self.known = {name: m.fingerprint for name, m in self.registry.models.items() if not m.removed}
        self.seen = {}
        self.scans = 0

    async def main(self) -> None:
        while True:
            await self.scan_once()
            await trio.sleep(self.interval_s)

    async def scan_once(self) -> None:
        found, root_of = await trio.to_thread.run_sync(scan_roots, self.roots)
        added, changed, removed = diff(self.known, {n: s.fingerprint for n, s in found.items()})
        now = time.time()
        first = self.scans == 0
        seen, self.seen = self.seen, {n: s.fingerprint for n, s in found.items()}
        for name in added + changed:
            st = found[name]
            ready = os.path.exists(os.path.join(st.path, READY_MARKER))
            settled = now - st.newest_mtime >= self.settle_s and (first or seen.get(name) == st.fingerprint)
            if not (ready or settled):
                continue  # still being written; look again next scan
            result = await trio.to_thread.run_sync(
                lambda: analyse(Path(st.path), name=name, root=root_of[name], options=self.options))
            if isinstance(result, Invalid):
                log.warning("model %s is invalid: %s", name, result.reason)
                self.log.publish(ModelInvalid(model=name, path=result.path, reason=result.reason,
                                              fingerprint=result.fingerprint))
            else:
                entry = self.registry.models.get(name)
                if entry is not None and entry.spec is not None:
                    self.log.publish(ModelChanged(model=name, spec=result))
                else:
                    log.info("model %s discovered: %s, %s", name, result.architecture, result.task)
                    self.log.publish(ModelDiscovered(model=name, spec=result))
            self.known[name] = st.fingerprint
        for name in removed:
            self.log.publish(ModelRemoved(model=name, path=self.registry.models[name].path
                                          if name in self.registry.models else ""))
            del self.known[name]
        self.scans += 1
