"""pytest plugin (entry point ``pytest11``, name ``kubectl_chaos``): the ``chaos`` fixture.

::

    def test_checkout_with_a_slow_database(chaos):
        chaos.limit("db-0", namespace="shop", cpu="200m")   # in force from here, read back
        assert checkout().status == 200
        # reverted at teardown, also when the test failed or raised

``chaos.limit(...)`` takes the arguments of :func:`plugin.api.limit`, applies at once and returns
the active :class:`plugin.api.Experiment` (``with chaos.limit(...):`` reverts at the end of the
block instead). Every experiment a test started is reverted at its teardown; a revert that fails
is an error of that test, saying what is still changed.

Where requests go, command line over ini file: ``--chaos-agent-address`` / ``chaos_agent_address``
(node-local), ``--chaos-kubeconfig`` / ``chaos_kubeconfig`` and ``--chaos-context`` /
``chaos_context`` (cluster; the default kubeconfig without them), ``--chaos-namespace`` /
``chaos_namespace``. A ``chaos.limit()`` that names ``agent_address``, ``kubeconfig`` or ``context``
itself uses only what it names.

SIGTERM while a test holds experiments stops the session as Ctrl-C does, so that pytest tears the
fixtures down and the limits are reverted (unless something else handles SIGTERM already).

Loading costs nothing (``-p no:kubectl_chaos`` disables it): :mod:`plugin.api`, and through it grpc
or kubernetes, is imported when a test first uses the fixture.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from plugin.api import Experiment
    from plugin.backends import Backend, Connection

__all__ = ["Chaos", "SigtermInterrupt"]

# (name, metavar, help): --chaos-NAME on the command line, chaos_NAME in the ini file.
_OPTIONS = (
    ("agent_address", "ADDRESS", "node-local mode: the chaos-agent at unix:///path or host:port"),
    ("kubeconfig", "PATH", "cluster mode: the kubeconfig file (default: $KUBECONFIG or ~/.kube/config)"),
    ("context", "NAME", "cluster mode: the kubeconfig context (default: its current context)"),
    ("namespace", "NAMESPACE", "the namespace of the pods (default: the context's; node-local: default)"),
)
_CONNECTION = ("agent_address", "kubeconfig", "context")


class SigtermInterrupt(KeyboardInterrupt):
    """SIGTERM during a test holding chaos experiments: pytest stops as on Ctrl-C and reverts them."""

    def __init__(self) -> None:
        super().__init__("SIGTERM")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kubectl-chaos", "kubectl-chaos: change container limits during tests")
    for name, metavar, text in _OPTIONS:
        group.addoption(f"--chaos-{name.replace('_', '-')}", dest=f"chaos_{name}", metavar=metavar, default=None,
                        help=f"{text}; the default of chaos.limit() (ini: chaos_{name})")
        parser.addini(f"chaos_{name}", help=f"kubectl-chaos: {text}", default="")


def chaos_defaults(config: pytest.Config) -> dict[str, str]:
    """The defaults of ``chaos.limit()``: the command line's, else the ini file's (a relative
    kubeconfig path is taken from where pytest was started, or from the ini file's directory)."""
    out = {}
    for name, _, _ in _OPTIONS:
        value = config.getoption(f"chaos_{name}")
        base = config.invocation_params.dir
        if not value:
            value = config.getini(f"chaos_{name}")
            base = config.inipath.parent if config.inipath is not None else config.rootpath
        if value:
            value = str(value).strip()
            if name == "kubeconfig":
                value = os.path.join(base, os.path.expanduser(value))
            out[name] = value
    return out


def pytest_report_header(config: pytest.Config) -> str | None:
    defaults = chaos_defaults(config)
    if not defaults:
        return None
    return "kubectl-chaos: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in defaults.items())


class Chaos:
    """The ``chaos`` fixture's object: :meth:`limit` starts experiments, :meth:`revert_all` ends them."""

    def __init__(self, defaults: dict[str, str], open_backend: Callable[[Connection], Backend] | None = None):
        self.defaults = dict(defaults)
        self.experiments: list[Experiment] = []
        self._open_backend = open_backend

    def limit(self, pod: str | None = None, **kwargs: Any) -> Experiment:
        """Apply now (as :func:`plugin.api.limit`, same arguments) and return the active experiment.

        It is reverted at the test's teardown, or at the end of ``with chaos.limit(...):``.
        """
        from plugin import api

        args = dict(kwargs)
        if all(args.get(k) is None for k in _CONNECTION):
            args.update({k: v for k, v in self.defaults.items() if k in _CONNECTION})
        if args.get("namespace") is None and "namespace" in self.defaults:
            args["namespace"] = self.defaults["namespace"]
        if args.get("duration") is None:
            args["duration"] = api.format_duration(api.DEFAULT_DURATION_S)
        request, connection = api.build_request(pod, **args)
        extra = {"open_backend": self._open_backend} if self._open_backend is not None else {}
        exp = api.Experiment(request, connection, sigterm_raises=SigtermInterrupt, **extra)
        self.experiments.append(exp)
        return exp.start()

    def revert_all(self) -> None:
        """Revert every experiment still active, newest first; then raise what failed."""
        from plugin.api import RevertFailed

        errors: list[BaseException] = []
        for exp in reversed(self.experiments):
            try:
                exp.stop()
            except BaseException as err:  # noqa: BLE001 - the others are reverted first
                errors.append(err)
        self.experiments = [e for e in self.experiments if e.active]
        interrupts = [e for e in errors if not isinstance(e, Exception)]
        if interrupts:
            raise interrupts[0]
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise RevertFailed(f"{len(errors)} reverts failed: " + " | ".join(str(e) for e in errors),
                               [s for e in errors for s in getattr(e, "still_changed", ())]) from errors[0]


@pytest.fixture
def chaos_backend_opener() -> Callable[[Connection], Backend] | None:
    """How ``chaos`` opens a backend for a Connection; None = the real ones. Override it in a conftest
    to run the fixture against an in-memory backend."""
    return None


@pytest.fixture
def chaos(request: pytest.FixtureRequest, chaos_backend_opener) -> Chaos:
    """Change container limits for this test: ``chaos.limit(pod, cpu="200m", ...)``; all reverted at teardown."""
    session = Chaos(chaos_defaults(request.config), chaos_backend_opener)
    try:
        yield session
    finally:
        session.revert_all()
