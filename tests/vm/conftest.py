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
from tests.support.require import require

REPO = pathlib.Path(__file__).resolve().parents[2]
GUEST_FILES = {
    "/opt/kcx/cgroupctl": REPO / "cgroupctl",
    "/opt/kcx/guest": REPO / "tests" / "vm" / "guest",
}
# Figures measured in this session, printed in the terminal summary (boot time, CPU shares, ...).
FIGURES: dict[str, object] = {}


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
def figures():
    """Record a measured figure for the terminal summary: ``figures[name] = value``."""
    return FIGURES


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


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", "cgroup v2 VM figures")
        for key, value in FIGURES.items():
            terminalreporter.write_line(f"{key}: {value}")


# ---- the cgroup v2 worker node (tests/support/v2node.py): one boot per session, many scenarios


@pytest.fixture(scope="session")
def v2node():
    """Debian forky with systemd, containerd 2.x, runc and crun in a QEMU VM, with the agent running."""
    from tests.support import v2node as v2

    missing = v2.missing_prerequisites()
    require(not missing, "the cgroup v2 node VM: " + "; ".join(missing))
    start = time.monotonic()
    early = v2.EARLY_BOOT.take()
    if early is not None:  # booted beside the unit tests (tests/conftest.py)
        node, agent = early
        FIGURES["v2 node boot: beside the unit tests, then waited s"] = round(time.monotonic() - start, 2)
    else:
        node = v2.V2Node()
        node.boot()
        agent = node.call("agent_start", wait_s=120)
    FIGURES.update({f"v2 node {k} s": round(v, 2) for k, v in node.timings_s.items()})
    FIGURES["v2 node agent start s"] = round(agent["start_s"], 2)
    FIGURES["v2 node versions"] = "; ".join(node.versions)
    _V2_NODE.append(node)
    try:
        yield node
    finally:
        _V2_NODE.clear()
        node.close()
        FIGURES["v2 node session s"] = round(time.monotonic() - start, 2)


# The v2 node of the session, once booted (for the protocol hook below).
_V2_NODE: list = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """A v2 node test that failed because the guest died (a kernel panic: CI run 11 saw one under TCG,
    in the emulated CPU, not in anything the test did) runs once more on a fresh guest. Only then:
    a failure with the guest alive is reported as it is, and so is a second failure. The reboot and
    the panic line are printed with the session's figures."""
    if "v2node" not in getattr(item, "fixturenames", ()):
        return None
    from _pytest.runner import runtestprotocol

    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    why = _V2_NODE[0].died() if _V2_NODE and any(r.failed for r in reports) else ""
    if why:
        t0 = time.monotonic()
        _V2_NODE[0].reboot()
        FIGURES.setdefault("v2 node guest died, rebooted, test run again", []).append(
            f"{item.name}: {why} (reboot {time.monotonic() - t0:.1f} s)")
        item._initrequest()  # the test's own fixtures are set up afresh
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
