"""What ``kubectl chaos status`` and ``kubectl chaos top`` report: :class:`ExperimentStatus` and
:class:`TopRow` (also importable from :mod:`plugin.backends`).

A module of their own, loaded the first time one of them is asked for: an apply never makes one,
and Python's generating their dataclass methods took 1.6 ms of every start of the command.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime

    from plugin.backends import ResourceChange

__all__ = ["ExperimentStatus", "TopRow"]


@dataclasses.dataclass(frozen=True)
class ExperimentStatus:
    """One active experiment: per resource ``previous`` = original, ``requested`` = chaos value,
    ``read_back`` = the value in force now (a difference from ``requested`` is drift)."""

    namespace: str
    pod: str
    container: str
    changes: tuple[ResourceChange, ...] = ()
    node: str | None = None
    experiment_id: str | None = None
    started_at: datetime | None = None
    state: str = "active"
    message: str = ""


@dataclasses.dataclass(frozen=True)
class TopRow:
    """One experiment's measured effect over the last interval (``kubectl chaos top``); None = could not
    be read (``errors`` says why). ``status`` has the limits (original, chaos, in force now)."""

    status: ExperimentStatus
    interval_s: float
    cpu_cores: float | None = None
    cpu_throttled_share: float | None = None
    memory_working_set_bytes: int | None = None
    memory_limit_bytes: int | None = None
    oom_kills: int | None = None
    ingress_bps: float | None = None
    ingress_drops: int | None = None
    ingress_backlog_bytes: int | None = None
    egress_bps: float | None = None
    egress_drops: int | None = None
    egress_backlog_bytes: int | None = None
    errors: tuple[str, ...] = ()
