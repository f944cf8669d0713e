"""One VM per test session: booting under TCG costs seconds, so every vm test shares one boot.

The guest gets cgroupctl (as committed in the working tree at session start) and tests/vm/guest
under /opt/kcx; ``run_driver`` runs a scenario there and returns its JSON report.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import time

import pytest

from tests.support import vm as vm_support
from tests.support.figures import FIGURES
from tests.support.require import require

REPO = pathlib.Path(__file__).resolve().parents[2]
GUEST_FILES = {
    "/opt/kcx/cgroupctl": REPO / "cgroupctl",
    "/opt/kcx/guest": REPO / "tests" / "vm" / "guest",
}


@pytest.fixture(scope="session")
def vm_prerequisites():
    """Skip locally, fail in CI, when qemu, the kernel (scripts/setup-vm.sh) or busybox is missing."""
    missing = vm_support.missing_prerequisites()
    require(not missing, "the cgroup v2 VM: " + "; ".join(missing))


@pytest.fixture(scope="session")
def vm(vm_prerequisites):
    machine = vm_support.Vm(GUEST_FILES)
    start = time.monotonic()
    machine.boot()
    FIGURES["boot_s"] = round(machine.boot_s, 2)
    try:
        yield machine
    finally:
        machine.close()
        FIGURES["vm_session_s"] = round(time.monotonic() - start, 2)


@pytest.fixture
def run_driver(vm):
    def run(name: str, timeout_s: float = 60.0) -> dict:
        script = f"cd /opt/kcx && exec python3 -m guest.driver {shlex.quote(name)}"
        result = vm.run(script, timeout_s=timeout_s)
        lines = result.stdout.strip().splitlines()
        assert not result.timed_out, f"scenario {name} timed out after {timeout_s} s:\n{result.stderr}"
        assert lines, f"scenario {name} printed nothing (exit {result.exit_code}):\n{result.stderr}"
        report = json.loads(lines[-1])
        assert report["ok"] and result.exit_code == 0, (
            f"scenario {name} failed (exit {result.exit_code}): {report.get('error')}\n{result.stderr}"
        )
        return report["result"]

    return run


# The cgroup v2 worker node's fixture (v2node) and ``figures`` are in tests/conftest.py: tests outside
# this directory run on the node too (tests/node/test_both_nodes.py, test_limits_both_nodes.py).
