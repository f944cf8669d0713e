"""Which CRI socket to talk to: argument, then CONTAINER_RUNTIME_ENDPOINT, then the usual paths."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping

from cri_api.errors import RuntimeUnreachable

ENV_VAR = "CONTAINER_RUNTIME_ENDPOINT"

# Probed in this order, like crictl's defaults (plus k3s's own containerd).
DEFAULT_SOCKETS = (
    "/run/containerd/containerd.sock",
    "/var/run/crio/crio.sock",
    "/run/k3s/containerd/containerd.sock",
    "/var/run/cri-dockerd.sock",
)


_HOST_PORT = re.compile(r"[^/]+:[0-9]+")


def to_target(endpoint: str) -> str:
    """A gRPC target for ``endpoint``: "unix:///abs/path" for a path or unix URL, else as given.

    A path may be relative (to the working directory) and need not say "unix://", as crictl
    allows; "host:port" and other "scheme://" targets go to gRPC unchanged.
    """
    if endpoint.startswith("unix://"):
        return "unix://" + "/" + endpoint[len("unix://") :].lstrip("/")
    if endpoint.startswith("unix:"):
        return "unix://" + os.path.abspath(endpoint[len("unix:") :])
    if "://" in endpoint or _HOST_PORT.fullmatch(endpoint):
        return endpoint
    return "unix://" + os.path.abspath(endpoint)


def socket_path(target: str) -> str | None:
    """The filesystem path of a unix target, or None for other transports."""
    if target.startswith("unix://"):
        return target[len("unix://") :]
    return None


def diagnose(path: str) -> str:
    """Why nothing may answer at the socket ``path``: missing, not a socket, or nobody listening."""
    question = f"is a runtime listening on {path}?"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{question} it does not exist"
    except OSError as err:
        return f"{question} {err.strerror}"
    if not stat.S_ISSOCK(mode):
        return f"{question} it is not a socket"
    return question


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def resolve(
    endpoint: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    host_root: str = "/",
    candidates: tuple[str, ...] = DEFAULT_SOCKETS,
) -> tuple[str, tuple[str, ...]]:
    """Return (gRPC target, sockets probed).

    ``host_root`` prefixes the probed default paths, so an agent that mounts the host's
    filesystem at /host finds /host/run/containerd/containerd.sock. An explicit endpoint or
    the environment variable is taken as given.
    """
    if endpoint:
        return to_target(endpoint), ()
    env = os.environ if env is None else env
    if env.get(ENV_VAR):
        return to_target(env[ENV_VAR]), ()
    tried = tuple(os.path.join(host_root, path.lstrip("/")) for path in candidates)
    for path in tried:
        if is_socket(path):
            return to_target(path), tried
    raise RuntimeUnreachable(
        f"no container runtime socket found: {ENV_VAR} is not set and none of {', '.join(tried)} "
        "is a socket; pass the endpoint explicitly",
        endpoint=None,
        tried=tried,
    )
