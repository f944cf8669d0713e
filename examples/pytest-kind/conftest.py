"""Fixtures of the example suite: the URL of the demo service's CPU-bound endpoint.

The ``chaos`` fixture comes from kubectl-chaos itself (``pip install kubectl-chaos`` registers it
with pytest); its options in pytest.ini (or ``--chaos-context``, ``--chaos-kubeconfig``,
``--chaos-namespace``) also tell ``kubectl port-forward`` where to go.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

import pytest

from plugin.pytest_plugin import chaos_defaults


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slow_url(pytestconfig):
    """``$SLOW_URL``, else a ``kubectl port-forward`` to svc/slow for the session."""
    if os.environ.get("SLOW_URL"):
        yield os.environ["SLOW_URL"]
        return
    where = chaos_defaults(pytestconfig)
    port = _free_port()
    argv = ["kubectl", "port-forward", "-n", where.get("namespace", "demo"), "svc/slow", f"{port}:80"]
    argv += [f"--context={where['context']}"] if "context" in where else []
    argv += [f"--kubeconfig={where['kubeconfig']}"] if "kubeconfig" in where else []
    forward = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/cgi-bin/work"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if forward.poll() is not None or time.monotonic() > deadline:
                    forward.kill()
                    pytest.fail(f"cannot reach svc/slow through {' '.join(argv)}: {forward.stderr.read()}")
                time.sleep(0.2)
        yield url
    finally:
        forward.terminate()
        forward.wait()
