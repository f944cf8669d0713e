"""A thin, typed client for the Kubernetes CRI runtime.v1 API (containerd, CRI-O, ...).

``RuntimeClient`` is loaded on first use so that ``import cri_api`` does not import grpc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cri_api.errors import (
    CallFailed,
    CRIError,
    InvalidRequest,
    NotFound,
    NotRunning,
    RuntimeUnreachable,
    Unimplemented,
)
from cri_api.merge import merge_resources
from cri_api.types import UNLIMITED, ContainerInfo, ExecResult, HugepageLimit, LinuxResources, VersionInfo

if TYPE_CHECKING:
    from cri_api.client import RuntimeClient

__all__ = [
    "UNLIMITED",
    "CRIError",
    "CallFailed",
    "ContainerInfo",
    "ExecResult",
    "HugepageLimit",
    "InvalidRequest",
    "LinuxResources",
    "NotFound",
    "NotRunning",
    "RuntimeClient",
    "RuntimeUnreachable",
    "Unimplemented",
    "VersionInfo",
    "merge_resources",
]


def __getattr__(name: str) -> Any:
    if name == "RuntimeClient":
        from cri_api.client import RuntimeClient

        return RuntimeClient
    raise AttributeError(f"module 'cri_api' has no attribute {name!r}")
