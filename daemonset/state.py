"""The agent's state directory: one JSON record per container under experiment.

Every write is atomic (temp file in the same directory, fsync, rename, fsync of the directory), so a
``kill -9`` at any moment leaves either the old or the new record, never a torn one. The engine
writes a record before it touches anything (phase ``applying``, with the snapshot of the
originals), again once the change is in force (``active``), and before it starts putting things
back (``reverting``); the record is deleted when the originals are back. On start-up the engine
reads every record and finishes what each phase implies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
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

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.root = pathlib.Path(state_dir) / "experiments"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StateError(f"cannot create state directory {self.root}: {e.strerror}") from e

    def path_for(self, key: str) -> pathlib.Path:
        return self.root / (record_name(key) + _SUFFIX)

    def save(self, key: str, record: dict[str, Any]) -> None:
        """Write ``record`` for ``key`` atomically and durably."""
        data = json.dumps({"schema": SCHEMA_VERSION, "key": key, **record}, sort_keys=True, indent=1).encode()
        final = self.path_for(key)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}.{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(self.root)
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
            _fsync_dir(self.root)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StateError(f"cannot delete state record {self.path_for(key)}: {e.strerror}") from e

    def load(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path_for(key).read_text())
        except FileNotFoundError:
            return None

    def load_all(self) -> Iterator[dict[str, Any]]:
        """Every readable record; leftovers of interrupted writes are removed, unreadable records set aside."""
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(_TMP_PREFIX):
                # An interrupted save: the rename never happened, so the previous record (if any) holds.
                path.unlink(missing_ok=True)
                continue
            if path.suffix != _SUFFIX:
                continue
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict) or "key" not in record:
                    raise ValueError("not a state record")
            except (OSError, ValueError) as e:
                bad = path.with_suffix(".corrupt")
                log.error("state record %s unreadable (%s); moved to %s", path, e, bad.name)
                os.replace(path, bad)
                continue
            if record.get("schema") != SCHEMA_VERSION:
                log.error("state record %s has schema %r, expected %d; ignored", path, record.get("schema"), SCHEMA_VERSION)
                continue
            yield record
