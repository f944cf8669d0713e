"""The agent's state directory: one JSON record per container under experiment.

Every write is atomic (temp file in the same directory, fsync, rename, fsync of the directory), so a
``kill -9`` at any moment leaves either the old or the new record, never a torn one. The engine
writes a record before it touches anything (phase ``applying``, with the snapshot of the
originals), again once the change is in force (``active``), and before it starts putting things
back (``reverting``); the record is deleted when the originals are back. On start-up the engine
reads every record and finishes what each phase implies.

Durability: every write is atomic (a ``kill -9`` of the agent never loses or tears a record: the
page cache outlives the process). A *durable* write is also fsynced, file and directory, before
it returns: the engine asks for that when a record carries a new snapshot of originals, before it
changes anything. Other writes (phase updates, deletions) are fsynced by a background flusher
within ``flush_interval_s``: losing one of those to a power cut loses nothing that the kernel
kept either (limits and qdiscs do not survive a reboot), and recovery handles the older record.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_SUFFIX = ".json"
_TMP_PREFIX = ".tmp-"


class StateError(Exception):
    """The state directory cannot be read or written."""


def record_name(key: str) -> str:
    """File stem for a container key (``namespace/pod/container``): stable, filesystem-safe."""
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """Atomic JSON records in ``state_dir/experiments``; thread-safe per record (callers serialize per key)."""

    def __init__(self, state_dir: str | os.PathLike[str], *, flush_interval_s: float = 0.5):
        self.root = pathlib.Path(state_dir) / "experiments"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StateError(f"cannot create state directory {self.root}: {e.strerror}") from e
        self.flush_interval_s = flush_interval_s
        self._dirty: set[pathlib.Path] = set()
        self._dir_dirty = False
        self._lock = threading.Lock()
        self._kick = threading.Event()
        self._closed = False
        self._flusher: threading.Thread | None = None
        self._lock_fd: int | None = None

    def _mark_dirty(self, path: pathlib.Path | None) -> None:
        with self._lock:
            if path is not None:
                self._dirty.add(path)
            self._dir_dirty = True
            if self._flusher is None and not self._closed:
                self._flusher = threading.Thread(target=self._flush_loop, name="state-flush", daemon=True)
                self._flusher.start()
        self._kick.set()

    def _flush_loop(self) -> None:
        while not self._closed:
            self._kick.wait()
            self._kick.clear()
            self.flush()
            # Batch whatever arrives meanwhile into the next round.
            threading.Event().wait(self.flush_interval_s)

    def flush(self) -> None:
        """fsync every record written without ``durable`` since the last flush, then the directory."""
        with self._lock:
            paths, self._dirty = self._dirty, set()
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # deleted meanwhile
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if dir_dirty:
            _fsync_dir(self.root)

    def lock(self) -> None:
        """Hold the state directory for this process: two agents on one directory would undo each other."""
        if self._lock_fd is not None:
            return
        path = self.root.parent / "agent.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(f"another chaos-agent is using the state directory {self.root.parent} ({path} is locked)") from None
        self._lock_fd = fd

    def close(self) -> None:
        self._closed = True
        self._kick.set()
        self.flush()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def path_for(self, key: str) -> pathlib.Path:
        return self.root / (record_name(key) + _SUFFIX)

    def save(self, key: str, record: dict[str, Any], *, durable: bool = True) -> None:
        """Write ``record`` (its JSON form, see ``daemonset.record``) for ``key`` atomically; with ``durable``
        also on disk before returning."""
        data = json.dumps(record, separators=(",", ":")).encode()
        final = self.path_for(key)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}.{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if durable:
                _fsync_dir(self.root)
            else:
                self._mark_dirty(final)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise StateError(f"cannot write state record {final}: {e.strerror}") from e

    def delete(self, key: str) -> None:
        """Remove the record of ``key``; a missing record is already deleted."""
        try:
            self.path_for(key).unlink()
            self._mark_dirty(None)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StateError(f"cannot delete state record {self.path_for(key)}: {e.strerror}") from e

    def load(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path_for(key).read_text())
        except FileNotFoundError:
            return None

    def load_all(self) -> Iterator[Loaded]:
        """Every record file with its parsed JSON, or the reason it could not be parsed.

        Leftovers of interrupted writes are removed (the rename never happened, so the previous
        record, if any, holds). Nothing else is moved or skipped: a file that cannot be read is the
        only trace of a change that may still be in force, so the engine lists it as damaged.
        """
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(_TMP_PREFIX):
                path.unlink(missing_ok=True)
                continue
            if path.suffix != _SUFFIX:
                continue
            try:
                raw = path.read_bytes()
            except OSError as e:
                yield Loaded(path, None, f"cannot read it: {e.strerror}")
                continue
            if not raw.strip():
                yield Loaded(path, None, f"empty ({len(raw)} bytes)")
                continue
            try:
                yield Loaded(path, json.loads(raw), "")
            except ValueError as e:
                yield Loaded(path, None, f"not JSON ({e}; {len(raw)} bytes)")

    def delete_file(self, path: pathlib.Path) -> None:
        """Remove a record file found by ``load_all`` (a damaged record that has been dealt with)."""
        try:
            path.unlink()
            self._mark_dirty(None)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StateError(f"cannot delete state record {path}: {e.strerror}") from e


@dataclasses.dataclass(frozen=True)
class Loaded:
    """One record file: its parsed JSON (None when unparseable) and why it could not be parsed."""

    path: pathlib.Path
    data: Any
    error: str
