"""The ``any_node`` fixture: the scenarios written once for both test nodes (issue #10) take it.

``v1-runc`` is the host node (cgroup v1, containerd 1.6, runc; the ``pods`` and ``agent`` fixtures),
``v2-runc`` and ``v2-crun`` the cgroup v2 node VM (systemd, containerd 2.x; the session's ``v2node``),
all through one face (tests/support/nodes.py). A test that means something on some of them only
says so and narrows the parameter: ``@pytest.mark.parametrize("any_node", [...], indirect=True)``.
The v2 runs are marked ``vm`` and ordered after every host test by tests/conftest.py.
"""

from __future__ import annotations

import pytest

from tests.node.test_agent import agent  # noqa: F401 - the host node's agent fixture
from tests.support.nodes import HostNode, V2NodeFace


@pytest.fixture(params=["v1-runc", "v2-runc", "v2-crun"])
def any_node(request):
    if request.param == "v1-runc":
        face = HostNode(request.getfixturevalue("pods"), request.getfixturevalue("agent"))
    else:
        face = V2NodeFace(request.getfixturevalue("v2node"), request.param.split("-", 1)[1])
    try:
        yield face
    finally:
        face.close()
