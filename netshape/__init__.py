"""netshape: two-way bandwidth limits on a pod's host-side veth, restored exactly afterwards.

Netlink only, through pyroute2. See docs/DESIGN.md for the contract with the agent.
"""

from netshape.errors import (
    DeviceMissing,
    HostNetwork,
    NamespaceGone,
    NetlinkFailed,
    NotVeth,
    OutOfRange,
    SeveralVeths,
    ShapeError,
    Unrestorable,
)
from netshape.plan import (
    DEFAULT_LATENCY_S,
    MAX_LATENCY_S,
    MAX_RATE_BPS,
    MIN_LATENCY_S,
    MIN_RATE_BPS,
    QueueInfo,
    Rates,
    default_burst_bytes,
    ifb_name,
    kernel_bps,
    plan_rates,
    queue_limit_bytes,
)
from netshape.shaper import check, read_queue, read_rates, shape, sweep_orphans, unshape
from netshape.snapshot import SavedQdisc, Snapshot
from netshape.veth import HostVeth, find_host_veth

__all__ = [
    "DEFAULT_LATENCY_S",
    "MAX_LATENCY_S",
    "MAX_RATE_BPS",
    "MIN_LATENCY_S",
    "MIN_RATE_BPS",
    "DeviceMissing",
    "HostNetwork",
    "HostVeth",
    "NamespaceGone",
    "NetlinkFailed",
    "NotVeth",
    "OutOfRange",
    "QueueInfo",
    "Rates",
    "SavedQdisc",
    "SeveralVeths",
    "ShapeError",
    "Snapshot",
    "Unrestorable",
    "check",
    "default_burst_bytes",
    "find_host_veth",
    "ifb_name",
    "kernel_bps",
    "plan_rates",
    "queue_limit_bytes",
    "read_queue",
    "read_rates",
    "shape",
    "sweep_orphans",
    "unshape",
]
