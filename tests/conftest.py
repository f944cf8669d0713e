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
    return pathlib.Path(str(item.fspath)).name == _V2_NODE_TESTS


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = pathlib.Path(str(item.fspath)).parts
        for part in parts:
            if part in _MARK_BY_DIR:
                item.add_marker(getattr(pytest.mark, part))
    # The v2 node's tests come first among the vm tests, right after the unit tests (the directories'
    # order), so that its boot, started with the unit tests, never runs beside the small VM's CPU
    # measurements. A stable sort: everything else keeps its order.
    items.sort(key=lambda item: 0 if not item.get_closest_marker("vm") else 1 if _is_v2_node_test(item) else 2)


def pytest_collection_finish(session):
    session.config._kcx_v2_node_selected = any(_is_v2_node_test(item) for item in session.items)


def pytest_runtest_setup(item):
    # A session with unit tests and v2 node tests boots the VM beside the unit tests
    # (tests/support/v2node.py EarlyBoot); without prerequisites the v2node fixture says what is missing.
    if item.get_closest_marker("unit") and getattr(item.config, "_kcx_v2_node_selected", False):
        from tests.support import v2node

        if not v2node.EARLY_BOOT.started and not v2node.missing_prerequisites():
            v2node.EARLY_BOOT.start()


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
