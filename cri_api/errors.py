"""Errors of the CRI client. Every message names the endpoint, call or object that failed."""

from __future__ import annotations


class CRIError(Exception):
    """Base class of everything the CRI client raises."""


class RuntimeUnreachable(CRIError):
    """No container runtime answers at the endpoint (or none of the usual sockets exists)."""

    def __init__(self, message: str, *, endpoint: str | None = None, tried: tuple[str, ...] = ()):
        super().__init__(message)
        self.endpoint = endpoint
        self.tried = tried


class NotFound(CRIError):
    """The pod, container or sandbox asked for does not exist; the message lists what does."""

    def __init__(self, message: str, *, wanted: str = "", existing: tuple[str, ...] = ()):
        super().__init__(message)
        self.wanted = wanted
        self.existing = existing


class NotRunning(CRIError):
    """The container exists but is not running (created, exited or unknown)."""

    def __init__(self, message: str, *, container_id: str = "", state: str = ""):
        super().__init__(message)
        self.container_id = container_id
        self.state = state


class CallFailed(CRIError):
    """The runtime answered a call with a gRPC error other than NOT_FOUND or UNAVAILABLE."""

    def __init__(self, message: str, *, method: str = "", code: str = "", details: str = ""):
        super().__init__(message)
        self.method = method
        self.code = code
        self.details = details


class Unimplemented(CallFailed):
    """The runtime answers gRPC but not this CRI call (no CRI plugin, or not CRI runtime.v1)."""


class InvalidRequest(CRIError, ValueError):
    """A value handed to the client cannot be sent (e.g. a zero that CRI would read as "unset")."""
