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


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = pathlib.Path(str(item.fspath)).parts
        for part in parts:
            if part in _MARK_BY_DIR:
                item.add_marker(getattr(pytest.mark, part))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # CI runs as root with every prerequisite installed: nothing may skip there.
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped in CI, which must run every test: {reason}"
