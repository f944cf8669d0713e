"""The cgroupctl error hierarchy: every message names what failed, the bad value and what is accepted."""

from __future__ import annotations


class CgroupError(Exception):
    """Base of every cgroupctl error."""


class NotFound(CgroupError):
    """A cgroup, controller or process could not be found (or would resolve outside the mount)."""


class OrderingError(CgroupError):
    """A request or write that breaks a kernel ordering rule (child above parent, memory above memsw)."""


class BelowUsage(CgroupError):
    """A memory limit below what the cgroup cannot give back; refused unless forced."""

    def __init__(self, message: str, *, path: str = "", limit_bytes: int = 0, unreclaimable_bytes: int = 0,
                 usage_bytes: int = 0):
        super().__init__(message)
        self.path = path
        self.limit_bytes = limit_bytes
        self.unreclaimable_bytes = unreclaimable_bytes
        self.usage_bytes = usage_bytes


class OutOfRange(CgroupError):
    """A value outside what the kernel accepts (quota, period, memory size)."""


class WriteFailed(CgroupError):
    """A cgroup file write the kernel refused, or whose read-back differs; carries path, value, errno."""

    def __init__(self, message: str, *, path: str = "", value: str = "", errno: int | None = None,
                 meaning: str = ""):
        super().__init__(message)
        self.path = path
        self.value = value
        self.errno = errno
        self.meaning = meaning
