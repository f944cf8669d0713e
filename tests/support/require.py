"""Prerequisite checks for tests that need the kernel, a node or a VM.

Outside CI a missing prerequisite skips the test with the reason. In CI (``CI`` set) the same
check fails the test: CI runs as root with every package installed, so a missing prerequisite
there is a broken set-up, not a reason to test less.
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(condition: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) unless ``condition`` holds; ``what`` names the prerequisite."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"prerequisite missing in CI: {what}", pytrace=False)
    pytest.skip(f"prerequisite missing: {what}")


def require_root() -> None:
    require(os.geteuid() == 0, "root (kernel tests write cgroups and network namespaces)")


def require_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    require(path is not None, f"the {name} binary on PATH")
    return path or name
