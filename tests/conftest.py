"""Test organisation: the directory a test lives in says what it needs.

tests/unit    -> unit    (anywhere)
tests/kernel  -> kernel  (root: cgroups, netns, tc)
tests/node    -> node    (a real containerd started by the fixtures)
tests/vm      -> vm      (cgroup v2 in a QEMU VM)
tests/cluster -> cluster (the fake Kubernetes API server)

Select with ``-m``, e.g. ``pytest -m unit``. In CI a skipped test counts as a failure.
"""

from __future__ import annotations

import pathlib

import pytest

from tests.support.require import in_ci

_MARK_BY_DIR = {"unit", "kernel", "node", "vm", "cluster"}


_V2_NODE_TESTS = "test_v2_node.py"


def _is_v2_node_test(item) -> bool:
    """A test that runs on the cgroup v2 node VM: tests/vm/test_v2_node.py, and the v2 runs of the
    scenarios written for both nodes (tests/node/test_both_nodes.py and test_limits_both_nodes.py,
    parameter ``any_node``)."""
    if pathlib.Path(str(item.fspath)).name == _V2_NODE_TESTS:
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and str(callspec.params.get("any_node", "")).startswith("v2")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_v2_node_test(item):  # wherever it is written, it needs the VM
            item.add_marker(pytest.mark.vm)
            continue
        parts = pathlib.Path(str(item.fspath)).parts
        for part in parts:
            if part in _MARK_BY_DIR:
                item.add_marker(getattr(pytest.mark, part))
    # The v2 node's tests come after every other test but the small VM's, right after the unit tests
    # (the directories' order), so that its boot, started with the unit tests, never runs beside a
    # host test's or the small VM's measurements (TCG keeps both cores busy). A stable sort:
    # everything else keeps its order.
    items.sort(key=lambda item: 1 if _is_v2_node_test(item) else 2 if item.get_closest_marker("vm") else 0)


def pytest_collection_finish(session):
    session.config._kcx_v2_node_selected = any(_is_v2_node_test(item) for item in session.items)


def pytest_runtest_setup(item):
    # A session with unit tests and v2 node tests boots the VM beside the unit tests
    # (tests/support/v2node.py EarlyBoot); without prerequisites the v2node fixture says what is missing.
    if item.get_closest_marker("unit") and getattr(item.config, "_kcx_v2_node_selected", False):
        from tests.support import v2node

        if not v2node.EARLY_BOOT.started and not v2node.missing_prerequisites():
            v2node.EARLY_BOOT.start()


# ---- the cgroup v2 worker node (tests/support/v2node.py): one boot per session, many scenarios


@pytest.fixture(scope="session")
def v2node():
    """Debian forky with systemd, containerd 2.x, runc and crun in a QEMU VM, with the agent running."""
    import time

    from tests.support import v2node as v2
    from tests.support.figures import FIGURES
    from tests.support.require import require

    missing = v2.missing_prerequisites()
    require(not missing, "the cgroup v2 node VM: " + "; ".join(missing))
    start = time.monotonic()
    early = v2.EARLY_BOOT.take()
    if early is not None:  # booted beside the unit tests
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


@pytest.fixture
def figures():
    """Record a measured figure for the terminal summary: ``figures[name] = value``."""
    from tests.support.figures import FIGURES

    return FIGURES


# The v2 node of the session, once booted (for the protocol hook below).
_V2_NODE: list = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """A v2 node test that failed because the guest died (a kernel panic: CI run 11 saw one under TCG,
    in the emulated CPU, not in anything the test did) runs once more on a fresh guest. Only then:
    a failure with the guest alive is reported as it is, and so is a second failure. The reboot and
    the panic line are printed with the session's figures."""
    if not _is_v2_node_test(item):
        return None
    import time

    from _pytest.runner import runtestprotocol

    from tests.support.figures import FIGURES

    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    why = _V2_NODE[0].died() if _V2_NODE and any(r.failed for r in reports) else ""
    if why:
        t0 = time.monotonic()
        _V2_NODE[0].reboot()
        FIGURES.setdefault("v2 node guest died, rebooted, test run again", []).append(  # type: ignore[union-attr]
            f"{item.name}: {why} (reboot {time.monotonic() - t0:.1f} s)")
        item._initrequest()  # the test's own fixtures are set up afresh
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_terminal_summary(terminalreporter):
    import sys

    figures = sys.modules.get("tests.support.figures")
    if figures is not None and figures.FIGURES:
        terminalreporter.write_sep("-", "measured figures (the VMs and the host node)")
        for key, value in figures.FIGURES.items():
            terminalreporter.write_line(f"{key}: {value}")


def pytest_sessionfinish(session):
    import sys

    v2node = sys.modules.get("tests.support.v2node")
    if v2node is not None:
        v2node.EARLY_BOOT.discard()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # CI runs as root with every prerequisite installed: nothing may skip there.
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped in CI, which must run every test: {reason}"


# ---- a real containerd node (tests/support/node.py); imported lazily so unit runs stay light


@pytest.fixture(scope="session")
def node():
    """A private containerd with the CRI plugin, shared by the session; torn down at the end."""
    import os

    from tests.support.require import require, require_binary

    require(os.geteuid() == 0, "root (the test node runs containerd, mounts and cgroups)")
    for binary in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "ip", "mount"):
        require_binary(binary)
    require(os.path.exists("/usr/lib/cni/bridge"), "CNI plugins in /usr/lib/cni (containernetworking-plugins)")
    require(os.path.exists("/bin/busybox"), "/bin/busybox (busybox-static) for the test images")
    from tests.support.node import TestNode, sigterm_as_interrupt

    with sigterm_as_interrupt():  # a SIGTERMed run tears down too; SIGKILL: the next start reaps
        test_node = TestNode().start()
        try:
            yield test_node
        finally:
            problems = test_node.stop()
            if problems:
                raise RuntimeError(f"test node teardown left: {problems}")


@pytest.fixture
def pods(node):
    """Factory: ``pods.run(name, namespace="default", containers=[ContainerSpec(...)])``; removes its pods."""
    from tests.support.node import PodFactory

    factory = PodFactory(node)
    try:
        yield factory
    finally:
        factory.cleanup()
