"""Errors of netshape: each message names what failed, the bad value and what is accepted."""

from __future__ import annotations


class ShapeError(Exception):
    """Base class of every netshape error."""


class HostNetwork(ShapeError):
    """The pod shares the node's network namespace, so shaping would hit the whole node."""


class NotVeth(ShapeError):
    """The pod's interface is not one end of a veth pair (ipvlan, macvlan, none)."""


class SeveralVeths(NotVeth):
    """The pod has more than one veth (a second network, e.g. Multus): which one to shape is not guessed."""


class NamespaceGone(ShapeError):
    """The pod's network namespace (its process) no longer exists."""


class DeviceMissing(ShapeError):
    """The host-side device to shape does not exist."""


class OutOfRange(ShapeError):
    """A rate, burst or option is outside what netshape accepts."""


class Unrestorable(ShapeError):
    """The device carries a qdisc tree netshape could not put back exactly, so it refuses to replace it."""


class NetlinkFailed(ShapeError):
    """The kernel refused a netlink request; carries the request and the errno."""

    def __init__(self, what: str, err: BaseException):
        code = getattr(err, "code", None) or getattr(err, "errno", None)
        super().__init__(f"{what}: {err}" + (f" (errno {code})" if code else ""))
        self.what = what
        self.errno = code
