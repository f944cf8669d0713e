"""Python API: change a running container's limits for the length of a block, then put them back.

::

    from plugin.api import limit

    with limit("web-0", namespace="shop", container="app", cpu="200m", bandwidth="2Mbps") as exp:
        run_the_load()                 # the limits are in force here, read back: exp.targets
        exp.in_force("cpu")            # what the kernel holds now (millicpu)
        exp.effect("2s")               # the measured effect, as `kubectl chaos top` shows it

The same requests as ``kubectl-chaos`` (values read with the CLI's own parsers, checked by the same
code before anything is sent, carried out by the same backends): node-local with
``agent_address=``, else cluster mode with ``kubeconfig=``/``context=`` (default kubeconfig), for
one pod or, in cluster mode, a label ``selector=``. Entering the block applies and returns once the
backend has read the change back; leaving it, by the end of the block, an exception, Ctrl-C or
SIGTERM, resets the originals exactly. A process that dies inside the block (SIGKILL, a lost
node) is covered by ``duration``, which the agent keeps: ``DEFAULT_DURATION_S`` when none is given.

Errors are the CLI's: :class:`plugin.errors.UsageError` for bad input (nothing was sent),
:class:`plugin.errors.BackendError` from the backends, and two kinds of the latter from here:
:class:`ApplyFailed` (some targets of a selector failed; the others were reverted) and
:class:`RevertFailed` (the reset on exit failed: the message says what is still changed, until
when, and the command that ends it; an exception from the block is its ``__cause__``).

``limit`` refuses a target that already has an experiment: its reset on exit would end that one
too. Change an experiment of your own with :meth:`Experiment.update`.

Also plain functions as the CLI's commands: :func:`apply`, :func:`reset`, :func:`status`.
Nothing here imports grpc or kubernetes; the backend that is used imports its own.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence

from plugin import backends
from plugin.backends import (
    RESOURCES,
    ApplyResult,
    Backend,
    ChaosRequest,
    Connection,
    ExperimentStatus,
    ResetResult,
    ResourceChange,
    TargetResult,
    TopRow,
)
from plugin.errors import BackendError, UsageError, one_line
from plugin.output import format_value
from plugin.request import Flags, build_connection, build_invocation, check_namespace
from plugin.units import (
    format_duration,
    parse_bandwidth,
    parse_cpu,
    parse_duration,
    parse_latency,
    parse_memory,
)

__all__ = [
    "DEFAULT_DURATION_S",
    "ApplyFailed",
    "Experiment",
    "ExperimentEnded",
    "RevertFailed",
    "Terminated",
    "apply",
    "build_request",
    "limit",
    "reset",
    "status",
]

#: The duration of a ``limit()`` that gives none: the agent reverts by itself after 10 minutes if
#: the process that opened the block dies without leaving it.
DEFAULT_DURATION_S = 600.0

# States of an ExperimentStatus in which nothing of the experiment is in force any more.
_ENDED_STATES = ("reverted", "failed")

Opener = Callable[[Connection], Backend]
Quantity = str | int


class ApplyFailed(BackendError):
    """Some targets could not be changed; ``result`` holds every target's outcome."""

    def __init__(self, message: str, result: ApplyResult):
        super().__init__(message)
        self.result = result


class RevertFailed(BackendError):
    """Putting the originals back failed; ``still_changed`` lists what is still in force."""

    def __init__(self, message: str, still_changed: Sequence[ExperimentStatus | TargetResult] = (),
                 body_error: BaseException | None = None):
        super().__init__(message)
        self.still_changed = tuple(still_changed)
        self.body_error = body_error


class Terminated(SystemExit):
    """SIGTERM arrived while an experiment was active: the block is left as on an exception (the
    limits are reverted) and the program exits with status 143, as SIGTERM would have ended it."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class ExperimentEnded(UserWarning):
    """The experiment ended before its block did (duration over, reset by someone, pod gone)."""


# ---------------------------------------------------------------------------------------------
# Arguments -> a validated ChaosRequest and Connection (the CLI's own checks)


# The CLI's names in its messages -> the keyword arguments here.
_KEYWORDS = {
    "--set-cpu": "cpu", "--set-memory": "memory", "--set-bandwidth": "bandwidth", "--direction": "direction",
    "--duration": "duration", "--method": "method", "--namespace": "namespace", "--container": "container",
    "-l/--selector": "selector", "--selector": "selector", "--agent-address": "agent_address",
    "--kubeconfig": "kubeconfig", "--context": "context", "--timeout": "timeout", "--reset": "reset()",
    "--force": "force", "--dry-run": "dry_run", "POD": "pod", "--over": "over", "--steps": "steps",
    "--latency": "latency",
}
_CLI_NAME = re.compile(r"-l/--selector|--[a-z][a-z-]*|\bPOD\b")


def _api_words(message: str) -> str:
    return _CLI_NAME.sub(lambda m: _KEYWORDS.get(m[0], m[0]), message)


_EXAMPLES = {"cpu": '"200m" or "2"', "memory": '"256Mi"', "bandwidth": '"2Mbps"', "duration": '"5m"',
             "timeout": '"30s"', "interval": '"2s"', "latency": '"20ms"'}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(name: str, value: object, parse: Callable[[str, str], object], *, ints: str | None = None) -> str | None:
    """``value`` as the CLI would have it typed, checked by the CLI's parser (errors name ``name``)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif _is_int(value) and ints is not None:
        text = str(value)
    else:
        accepts = f"give a string like {_EXAMPLES[name]}" + (f" or an int ({ints})" if ints else "")
        if name == "cpu" and _is_int(value):
            accepts = f'an int is ambiguous: write "{value}m" for millicores or "{value}" for cores'
        raise UsageError(f"{name}: {value!r} is not a string; {accepts}")
    # A range (a stepped profile, with over=): both ends are checked; the request builder checks the rest.
    for part in text.split("..", 1) if ".." in text else (text,):
        parse(part.strip(), name)
    return text


def _bad_steps(value: object) -> str:
    raise UsageError(f"steps: {value!r} is not a whole number; give 2 to 1000")


def _seconds_text(name: str, value: object) -> str | None:
    """A duration as the CLI reads it: a string with a unit, or a timedelta."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
        if seconds <= 0:
            raise UsageError(f"{name}: {value} is not a positive duration")
        value = format_duration(seconds)
    if not isinstance(value, str):
        hint = f' (write "{value}s" for seconds)' if _is_int(value) or isinstance(value, float) else ""
        raise UsageError(f"{name}: {value!r} is not a string; give a string like {_EXAMPLES[name]} "
                         f"or a datetime.timedelta{hint}")
    parse_duration(value, name)
    return value


def _latency_text(value: object) -> str | None:
    """A queue budget as the CLI reads it: a string with ms or s, or a timedelta."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        value = f"{value.total_seconds() * 1000:g}ms"
    if not isinstance(value, str):
        hint = f' (write "{value}ms" or "{value}s")' if _is_int(value) or isinstance(value, float) else ""
        raise UsageError(f"latency: {value!r} is not a string; give a string like {_EXAMPLES['latency']} "
                         f"or a datetime.timedelta{hint}")
    parse_latency(value, "latency")
    return value


def _name(name: str, value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise UsageError(f"{name}: {value!r} is not a string")


def _path(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise UsageError(f"{name}: {value!r} is not a path")
    return os.path.expanduser(os.fspath(value))


def build_request(
    pod: str | None = None,
    *,
    namespace: str | None = None,
    container: str | None = None,
    selector: str | None = None,
    cpu: Quantity | None = None,
    memory: Quantity | None = None,
    bandwidth: Quantity | None = None,
    direction: str = "both",
    duration: str | datetime.timedelta | None = None,
    method: str = "auto",
    force: bool = False,
    dry_run: bool = False,
    reset: bool = False,
    agent_address: str | None = None,
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    timeout: str | datetime.timedelta | None = None,
    over: str | datetime.timedelta | None = None,
    steps: int | None = None,
    latency: str | datetime.timedelta | None = None,
) -> tuple[ChaosRequest, Connection]:
    """The validated request and connection these arguments make; raises UsageError, sends nothing.

    A range as a quantity (``cpu="1000m..100m"``) with ``over`` (and ``steps``, default 10) is a
    stepped profile the agent runs (node-local mode, ``agent_address``). ``latency`` (with
    ``bandwidth``: ``"20ms"`` or a timedelta, 1ms to 10s, default 50ms) bounds each shaped direction's
    queue.

    Quantities are strings in the CLI's units (``"200m"``, ``"256Mi"``, ``"2Mbps"``, ``"5m"``);
    ``memory`` also takes an int (bytes), ``bandwidth`` an int (bit/s), ``duration``/``timeout`` a
    ``datetime.timedelta``. ``cpu`` takes no int: ``200`` would be 200 cores to Kubernetes.
    """
    for flag, value in (("force", force), ("dry_run", dry_run), ("reset", reset)):
        if not isinstance(value, bool):
            raise UsageError(f"{flag}: {value!r} is not True or False")
    if pod is None and selector is None:
        raise UsageError("name the target: pod= (a pod name) or selector= (a label selector, cluster mode)")
    cpu_text = _text("cpu", cpu, parse_cpu)
    memory_text = _text("memory", memory, parse_memory, ints="bytes")
    bandwidth_text = _text("bandwidth", bandwidth, parse_bandwidth, ints="bits per second")
    if not reset and cpu_text is None and memory_text is None and bandwidth_text is None:
        raise UsageError("nothing to change: give cpu=, memory= or bandwidth=")
    flags = Flags(
        pod=_name("pod", pod), namespace=_name("namespace", namespace), container=_name("container", container),
        selector=_name("selector", selector),
        set_cpu=cpu_text, set_memory=memory_text, set_bandwidth=bandwidth_text,
        # The defaults are the CLI's absent flags; any other value goes through the CLI's checks.
        direction=None if direction == "both" else direction,
        method=None if method == "auto" else method,
        duration=_seconds_text("duration", duration),
        reset=reset, dry_run=dry_run, force=force,
        agent_address=_name("agent_address", agent_address), kubeconfig=_path("kubeconfig", kubeconfig),
        context=_name("context", context), timeout=_seconds_text("timeout", timeout),
        over=_seconds_text("over", over),
        steps=None if steps is None else str(steps) if _is_int(steps) else _bad_steps(steps),
        latency=_latency_text(latency),
    )
    try:
        invocation = build_invocation(flags)
    except UsageError as err:
        raise UsageError(_api_words(str(err))) from None
    return invocation.request, invocation.connection


# ---------------------------------------------------------------------------------------------
# Signals: SIGTERM inside a block leaves it; Ctrl-C or SIGTERM during an apply or a revert waits


_lock = threading.RLock()
_active: list[Experiment] = []  # started and not yet reverted, oldest first
_atexit_registered = False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_sigterm(signum: int, frame: object) -> None:
    live = [e for e in _active if e._state == "active" and e._owner_pid == os.getpid()]
    if not live:
        # A forked child (it inherits the handler, not the experiments), or nothing left: SIGTERM's
        # own default, ending the process.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise live[-1]._sigterm_raises()


class _HeldSignals:
    """Hold SIGINT and SIGTERM while an apply or a revert is on its way, then act on them.

    An interrupted reset would leave the limits changed: the signal waits until the backend has
    answered (at most its timeout). A second Ctrl-C does not wait. Main thread only (elsewhere
    Python delivers no signals anyway).
    """

    def __init__(self, sigterm_raises: Callable[[], BaseException]):
        self.sigterm_raises = sigterm_raises
        self.saved: dict[int, object] = {}  # the handlers put back on exit
        self.pending: list[int] = []

    def _hold(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.pending:
            raise KeyboardInterrupt
        self.pending.append(signum)

    def __enter__(self) -> _HeldSignals:
        if _in_main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(signum)
                if handler is not None and handler is not signal.SIG_IGN:
                    self.saved[signum] = handler
                    signal.signal(signum, self._hold)
        return self

    def after(self, signum: int) -> object:
        """The handler ``signum`` will have once released."""
        return self.saved[signum] if signum in self.saved else signal.getsignal(signum)

    def set_after(self, signum: int, handler: object) -> None:
        if signum in self.saved:
            self.saved[signum] = handler
        elif _in_main_thread():
            signal.signal(signum, handler)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(self.pending):
            handler = signal.getsignal(signum)
            if signum == signal.SIGINT and handler is signal.default_int_handler:
                raise KeyboardInterrupt
            if signum == signal.SIGTERM and handler is signal.SIG_DFL:
                raise self.sigterm_raises()  # as SIGTERM inside the block: leave it, then exit
            signal.raise_signal(signum)  # whatever handler is in place now decides


def _track(exp: Experiment, held: _HeldSignals) -> None:
    global _atexit_registered
    with _lock:
        _active.append(exp)
        if not _atexit_registered:
            atexit.register(_revert_at_exit)
            _atexit_registered = True
        # Only where SIGTERM still has its default: a program (or pytest plugin) with a handler of
        # its own has already decided what SIGTERM does.
        if _in_main_thread() and held.after(signal.SIGTERM) is signal.SIG_DFL:
            held.set_after(signal.SIGTERM, _on_sigterm)


def _untrack(exp: Experiment, held: _HeldSignals) -> None:
    with _lock:
        if exp in _active:
            _active.remove(exp)
        if not any(e._state == "active" for e in _active) and held.after(signal.SIGTERM) is _on_sigterm:
            held.set_after(signal.SIGTERM, signal.SIG_DFL)


def _revert_at_exit() -> None:
    """Experiments started with ``start()`` and never stopped are reverted when the interpreter exits."""
    for exp in reversed(list(_active)):
        if exp._owner_pid != os.getpid():
            continue
        try:
            exp.stop()
            print(f"kubectl-chaos: reverted {exp._describe_target()} at exit (it was never stopped)", file=sys.stderr)
        except BaseException as err:  # noqa: BLE001 - at exit: say it, never a traceback
            print(f"kubectl-chaos: at exit: {one_line(str(err)) or type(err).__name__}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The experiment


def _key(t: TargetResult | ExperimentStatus) -> tuple[str, str, str]:
    return t.namespace, t.pod, t.container


def _where(t: TargetResult | ExperimentStatus) -> str:
    return "/".join(part for part in _key(t) if part)


def _values(changes: Sequence[ResourceChange], originals: dict[str, int | None] | None = None) -> str:
    out = []
    for c in changes:
        value = c.requested if c.unknown else c.read_back
        original = (originals or {}).get(c.resource, c.previous)
        out.append(f"{c.resource} {format_value(c.resource, value)} (original {format_value(c.resource, original)})")
    return ", ".join(out) or "nothing read back"


def _live(items: Sequence[ExperimentStatus]) -> list[ExperimentStatus]:
    return [s for s in items if s.state not in _ENDED_STATES]


class Experiment:
    """One ``limit()``: a request, applied by :meth:`start` (or entering ``with``), reverted by
    :meth:`stop` (or leaving it). Not thread-safe; signals are handled in the main thread only.

    ``targets`` is what the backend read back at the last apply (one :class:`TargetResult` per
    container: per resource ``previous``, ``requested``, ``read_back``); :meth:`status` re-reads what
    is in force now (per resource ``previous`` = the original, ``read_back`` = now).
    """

    def __init__(self, request: ChaosRequest, connection: Connection, *,
                 open_backend: Opener = backends.open_backend,
                 sigterm_raises: Callable[[], BaseException] = Terminated):
        """``sigterm_raises`` makes what SIGTERM raises inside the block (the pytest plugin's raises
        a KeyboardInterrupt, so that pytest stops the session)."""
        self.request = request
        self.connection = connection
        self._open_backend = open_backend
        self._sigterm_raises = sigterm_raises
        self._backend: Backend | None = None
        self._req: ChaosRequest = request  # with the namespace resolved once started
        self._result: ApplyResult | None = None
        self._originals: dict[tuple[str, str, str], dict[str, int | None]] = {}
        self._owner_pid: int | None = None
        self._state = "new"  # new -> active -> ended | revert-failed (stop() again retries)
        self.reset_result: ResetResult | None = None
        self.current: tuple[ExperimentStatus, ...] = ()

    # -- the block ---------------------------------------------------------------------------------

    def __enter__(self) -> Experiment:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop(exc)
        return False

    @property
    def active(self) -> bool:
        """Applied and not (successfully) reverted."""
        return self._state in ("active", "revert-failed")

    @property
    def state(self) -> str:
        """``new``, ``active``, ``ended``, or ``revert-failed`` (still changed; ``stop()`` retries)."""
        return self._state

    def start(self) -> Experiment:
        """Apply and return once the backend has read the change back (no-op when active)."""
        if self.active:
            return self
        try:
            with _HeldSignals(self._sigterm_raises) as held:
                self._apply(held)
        except BaseException as exc:
            if self.active:  # applied, then a held Ctrl-C or SIGTERM: leave as the block would
                self._stop(exc)
            raise
        return self

    def stop(self) -> ResetResult | None:
        """Put the originals back; raises :class:`RevertFailed` saying what is still changed."""
        return self._stop(None)

    def update(self, *, cpu: Quantity | None = None, memory: Quantity | None = None,
               bandwidth: Quantity | None = None, direction: str = "both",
               duration: str | datetime.timedelta | None = None, method: str = "auto",
               force: bool | None = None) -> ApplyResult:
        """Change the running experiment (on top of it; the originals stay the first ones).

        Without ``duration`` the experiment keeps the end time it has.
        """
        if self._state != "active" or self._backend is None:
            raise UsageError(f"update(): the experiment on {self._describe_target()} is {self._state}, not active")
        req, _ = build_request(
            self._req.pod, namespace=self._req.namespace, container=self._req.container,
            selector=self._req.selector, cpu=cpu, memory=memory, bandwidth=bandwidth, direction=direction,
            duration=duration, method=method, force=self._req.force if force is None else force)
        with _HeldSignals(self._sigterm_raises):
            result = self._backend.apply(req)
            self._result = result
            for t in result.targets:  # a resource changed for the first time: its original is "previous"
                originals = self._originals.setdefault(_key(t), {})
                for c in t.changes:
                    originals.setdefault(c.resource, c.previous)
        if not result.ok:
            raise ApplyFailed(f"update() could not change {_failures(result)}; the experiment is still active "
                              "and its end reverts every target", result)
        return result

    # -- what is in force --------------------------------------------------------------------------

    @property
    def result(self) -> ApplyResult | None:
        """The last apply's result (None before ``start()``)."""
        return self._result

    @property
    def targets(self) -> tuple[TargetResult, ...]:
        """One entry per container changed, as read back by the last apply."""
        return self._result.targets if self._result is not None else ()

    @property
    def created(self) -> bool | None:
        """Whether the last apply started the experiment (True) or changed one in force (False), on
        every target; None when the backend does not say (a selector's targets may differ: see
        ``targets[i].created``)."""
        found = {t.created for t in self.targets}
        return found.pop() if len(found) == 1 else None

    @property
    def expires_at(self) -> datetime.datetime | None:
        """When the agent reverts by itself (UTC), from the last apply."""
        moments = [c.expires_at for t in self.targets for c in t.changes if c.expires_at is not None]
        return min(moments) if moments else None

    def status(self) -> tuple[ExperimentStatus, ...]:
        """Re-read this experiment's targets from the backend: ``read_back`` is what is in force now."""
        if self._backend is None:
            raise UsageError(f"status(): the experiment on {self._describe_target()} is {self._state}, not active")
        return self._mine(self._backend.status(self._req.namespace))

    def refresh(self) -> tuple[ExperimentStatus, ...]:
        """:meth:`status`, also kept in ``self.current``."""
        self.current = self.status()
        return self.current

    def effect(self, interval: str | datetime.timedelta = "2s") -> tuple[TopRow, ...]:
        """The measured effect over the next ``interval``, one row per target, as ``kubectl chaos top``
        shows it: CPU cores used and the share of CFS periods throttled, memory working set and OOM
        kills since the start, per shaped direction throughput, drops and backlog (None = could not
        be read; ``errors`` says why). Raises BackendError where the backend measures nothing."""
        if self._state != "active" or self._backend is None:
            raise UsageError(f"effect(): the experiment on {self._describe_target()} is {self._state}, not active")
        seconds = parse_duration(_seconds_text("interval", interval), "interval")
        top = getattr(self._backend, "top", None)
        if top is None:
            raise BackendError(f"the {self.connection.mode} backend of this build measures no effect figures "
                               "(kubectl chaos top reads them from the agent: use agent_address=)")
        for rows in top(self._req.namespace, seconds, 1):
            return tuple(r for r in rows if self._is_mine(r.status))
        return ()

    def read_back(self, resource: str, pod: str | None = None) -> int | None:
        """``resource``'s value read back at the last apply (None = unlimited)."""
        return _change(self.targets, resource, pod).read_back

    def original(self, resource: str, pod: str | None = None) -> int | None:
        """``resource``'s value before the experiment (None = unlimited)."""
        target = _pick(self.targets, pod)
        _change((target,), resource, None)
        return self._originals[_key(target)][resource]

    def in_force(self, resource: str, pod: str | None = None) -> int | None:
        """``resource``'s value in force now, read from the backend (None = unlimited)."""
        change = _change(self.refresh(), resource, pod)
        if change.unknown:
            raise BackendError(f"{resource} of {pod or self._describe_target()} cannot be read now: {change.unknown}")
        return change.read_back

    def __repr__(self) -> str:
        wanted = {"cpu": self.request.cpu_millicpu, "memory": self.request.memory_bytes,
                  "bandwidth": self.request.bandwidth_bps}
        values = "".join(f" {k}={format_value(k, v)}" for k, v in wanted.items() if v is not None)
        return f"<Experiment {self._describe_target()}{values} {self._state}>"

    # -- apply ------------------------------------------------------------------------------------

    def _apply(self, held: _HeldSignals) -> None:
        backend = self._open_backend(self.connection)
        try:
            req = self.request
            if req.namespace is None:
                req = dataclasses.replace(req, namespace=backend.default_namespace())
            self._req = req
            taken = self._taken(backend, req)
            self._refuse_taken(backend, req, taken)
            try:
                result = backend.apply(req)
            except Exception as err:
                if req.pod is not None:
                    self._clean_up_failed_apply(backend, req, taken, err)
                raise
            if not result.ok:
                self._give_up_partial(backend, req, result)
        except BaseException:
            backend.close()
            raise
        self._backend, self._result = backend, result
        self._originals = {_key(t): {c.resource: c.previous for c in t.changes} for t in result.targets}
        self._owner_pid = os.getpid()
        self._state = "active"
        _track(self, held)

    def _taken(self, backend: Backend, req: ChaosRequest) -> Callable[[ExperimentStatus], bool]:
        """Whether an experiment in the status is on (one of) the request's containers."""
        if req.pod is not None:
            return lambda s: s.pod == req.pod and (req.container is None or s.container in (req.container, ""))
        from daemonset import crd  # pure; the selector as the cluster backend writes it

        try:
            pending = "-l " + crd.selector_text(crd.parse_selector(req.selector or ""))
        except crd.SpecError as err:
            raise UsageError(f"selector: {err}") from None
        # The pods it matches now, as the backend resolves them (a dry run changes nothing).
        matched = {_key(t) for t in backend.apply(dataclasses.replace(req, dry_run=True)).targets}
        return lambda s: _key(s) in matched or s.pod == pending

    def _refuse_taken(self, backend: Backend, req: ChaosRequest, taken: Callable[[ExperimentStatus], bool]) -> None:
        """No experiment may be on the target already: the reset at the end would end it too."""
        busy = [s for s in _live(backend.status(req.namespace)) if taken(s)]
        if busy:
            first = busy[0]
            raise BackendError(
                f"{_where(first)} already has an experiment ({_values(first.changes)}, {first.state}"
                f"{', ' + first.experiment_id if first.experiment_id else ''}); limit() resets its target at the "
                f"end, which would end that one too: end it first (kubectl-chaos status -n {first.namespace} "
                "shows it) or make every change in one limit() (Experiment.update changes a running one)")

    def _clean_up_failed_apply(self, backend: Backend, req: ChaosRequest, taken: Callable[[ExperimentStatus], bool],
                               err: BaseException) -> None:
        """The apply failed, perhaps after the agent made the change (a connection cut off): what the
        target (free just before: ``_refuse_taken``) has now is ours; reset it."""
        try:
            for s in _live(backend.status(req.namespace)):
                if taken(s):
                    backend.reset(ChaosRequest(namespace=s.namespace, pod=s.pod, container=s.container or None,
                                               reset=True, force=req.force))
        except Exception as cleanup:  # noqa: BLE001 - the apply's own error is the one to raise
            _note(err, f"kubectl-chaos: could not check whether {req.target} was changed after all: "
                       f"{one_line(str(cleanup))}; check with kubectl-chaos status")

    def _give_up_partial(self, backend: Backend, req: ChaosRequest, result: ApplyResult) -> None:
        changed = [t for t in result.targets if t.error is None]
        failure = ApplyFailed(f"could not change {_failures(result)}"
                              + (f"; reverted the {len(changed)} changed" if changed else ""), result)
        if changed:
            try:
                done = backend.reset(ChaosRequest(namespace=req.namespace, pod=req.pod, container=req.container,
                                                  selector=req.selector, reset=True, force=req.force))
                error = _failures(done) or _inexact(done)
            except BackendError as e:
                error = str(e)
            if error:
                raise RevertFailed(
                    f"could not change {_failures(result)}, and reverting the others failed: {error}; still "
                    "changed: " + "; ".join(f"{_where(t)}: {_values(t.changes)}" for t in changed)
                    + f"; to end it now: {self._reset_command()}", changed, failure) from failure
        raise failure

    # -- revert -----------------------------------------------------------------------------------

    def _stop(self, body_error: BaseException | None) -> ResetResult | None:
        if not self.active or self._owner_pid != os.getpid():
            return None  # never started, already reverted, or a forked child: the parent's to revert
        with _HeldSignals(self._sigterm_raises) as held:
            return self._revert(body_error, held)

    def _revert(self, body_error: BaseException | None, held: _HeldSignals) -> ResetResult | None:
        assert self._backend is not None
        retry = self._state == "revert-failed"
        try:
            before = self._status_or_none()
            done = None
            if before != []:  # [] = nothing listed: it ended (the agent forgets ended experiments)
                try:
                    done = self._reset_all()
                    failed, inexact = _failures(done), _inexact(done)
                except BackendError as err:
                    failed, inexact = str(err), None
                if inexact:  # ended, but not as it was: nothing a retry could change
                    self._end(held, done)
                    raise RevertFailed(f"the revert of {self._describe_target()} put back other values than the "
                                       f"originals: {inexact}", done.targets, body_error) from body_error
                if failed:
                    still = self._status_or_none()
                    still = None if still is None else _live(still)
                    if still != []:  # [] = it did end (e.g. just after the backend's timeout)
                        self._state = "revert-failed"
                        message = f"could not revert {self._describe_target()}: {failed}; {self._left_text(still)}"
                        if body_error is not None:
                            message += f"; the block had raised {type(body_error).__name__}"
                            message += f": {one_line(str(body_error))}" if str(body_error) else ""
                        raise RevertFailed(message, still if still is not None else self.targets,
                                           body_error) from body_error
        except KeyboardInterrupt as err:
            # A second Ctrl-C: we stop waiting for the backend; what it did is unknown.
            self._state = "revert-failed"
            left = f"kubectl-chaos: the revert was interrupted; {self._left_text(None)}"
            _note(err, left)
            print(left, file=sys.stderr)
            raise
        self._end(held, done)
        if before is not None and not _live(before) and not retry:
            warnings.warn(ExperimentEnded(
                f"the experiment on {self._describe_target()} had ended before its block did (its duration "
                f"ran out, someone reset it, or its pod went away): part of the block ran without the limits"),
                stacklevel=4)
        return done

    def _end(self, held: _HeldSignals, done: ResetResult | None) -> None:
        self._state = "ended"
        _untrack(self, held)
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        self.reset_result = done

    def _reset_all(self) -> ResetResult:
        assert self._backend is not None
        req = self._req
        if req.selector is not None:
            return self._backend.reset(ChaosRequest(namespace=req.namespace, selector=req.selector, reset=True,
                                                    force=req.force))
        targets: list[TargetResult] = []
        for t in self.targets:
            targets.extend(self._backend.reset(ChaosRequest(namespace=t.namespace, pod=t.pod,
                                                            container=t.container or None, reset=True,
                                                            force=req.force)).targets)
        return ResetResult(targets=tuple(targets))

    def _status_or_none(self) -> list[ExperimentStatus] | None:
        try:
            return list(self._mine(self._backend.status(self._req.namespace))) if self._backend else None
        except Exception:  # noqa: BLE001 - an unreadable status only makes the message vaguer
            return None

    def _mine(self, items: Sequence[ExperimentStatus]) -> tuple[ExperimentStatus, ...]:
        return tuple(s for s in items if self._is_mine(s))

    def _is_mine(self, s: ExperimentStatus) -> bool:
        # By experiment id where there is one (also a pod a selector matched later; not a newer
        # experiment of someone else on the same container), else by container.
        ids = {t.experiment_id for t in self.targets if t.experiment_id}
        if s.experiment_id and ids:
            return s.experiment_id in ids
        return _key(s) in {_key(t) for t in self.targets}

    def _left_text(self, still: Sequence[ExperimentStatus] | None) -> str:
        """What is still changed (from a fresh status, else from the last apply), until when, and how to end it."""
        if still is not None:
            text = "still changed: " + "; ".join(
                f"{_where(s)}: {_values(s.changes)} ({s.state}{': ' + s.message if s.message else ''})" for s in still)
            moments = [c.expires_at for s in still for c in s.changes if c.expires_at]
        else:
            text = "the backend cannot tell now; presumably still changed: " + "; ".join(
                f"{_where(t)}: {_values(t.changes, self._originals.get(_key(t)))}" for t in self.targets)
            moments = [self.expires_at] if self.expires_at else []
        if moments:
            text += f"; the agent ends it by itself at {min(moments).strftime('%Y-%m-%dT%H:%M:%SZ')}"
        return text + f"; to end it now: {self._reset_command()}"

    def _reset_command(self) -> str:
        req = self._req
        argv = ["kubectl-chaos", "--reset", "-n", req.namespace or "default"]
        if req.selector is not None:
            argv += ["-l", req.selector]
        else:
            container = self.targets[0].container if self.targets else req.container
            argv += [req.pod or ""] + (["-c", container] if container else [])
        conn = self.connection
        if conn.agent_address is not None:
            argv += ["--agent-address", str(conn.agent_address)]
        argv += ["--kubeconfig", conn.kubeconfig] if conn.kubeconfig else []
        argv += ["--context", conn.context] if conn.context else []
        return shlex.join(argv)

    def _describe_target(self) -> str:
        if self._req.selector is None and len(self.targets) == 1:
            return _where(self.targets[0])
        return self._req.target


def _pick(targets: Sequence[TargetResult | ExperimentStatus], pod: str | None) -> TargetResult | ExperimentStatus:
    if pod is None:
        if len(targets) == 1:
            return targets[0]
        if not targets:
            raise UsageError("no target: the experiment is not active")
        raise UsageError(f"{len(targets)} targets ({', '.join(sorted({t.pod for t in targets}))}): pass pod=")
    for t in targets:
        if t.pod == pod:
            return t
    raise UsageError(f"pod={pod!r} is not a target of this experiment; targets: "
                     + ", ".join(sorted({t.pod for t in targets})))


def _change(targets: Sequence[TargetResult | ExperimentStatus], resource: str, pod: str | None) -> ResourceChange:
    if resource not in RESOURCES:
        raise UsageError(f"resource {resource!r}: use one of {', '.join(RESOURCES)}")
    target = _pick(targets, pod)
    for c in target.changes:
        if c.resource == resource:
            return c
    raise UsageError(f"{resource} is not changed on {_where(target)}; changed: "
                     + (", ".join(c.resource for c in target.changes) or "nothing"))


def _failures(result: ApplyResult | ResetResult) -> str:
    return "; ".join(f"{_where(t)}: {one_line(t.error)}" for t in result.targets if t.error)


def _inexact(done: ResetResult) -> str:
    """A reset that reads back other values than the originals is not a revert."""
    return "; ".join(f"{_where(t)} {c.resource} is {format_value(c.resource, c.read_back)}, not "
                     f"{format_value(c.resource, c.requested)}"
                     for t in done.targets for c in t.changes
                     if not t.error and not c.unknown and c.read_back != c.requested)


def _note(err: BaseException, text: str) -> None:
    if hasattr(err, "add_note"):  # Python 3.11+
        err.add_note(text)


# ---------------------------------------------------------------------------------------------
# Public entry points


def limit(
    pod: str | None = None,
    *,
    namespace: str | None = None,
    container: str | None = None,
    selector: str | None = None,
    cpu: Quantity | None = None,
    memory: Quantity | None = None,
    bandwidth: Quantity | None = None,
    direction: str = "both",
    duration: str | datetime.timedelta | None = None,
    method: str = "auto",
    force: bool = False,
    agent_address: str | None = None,
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    timeout: str | datetime.timedelta | None = None,
    over: str | datetime.timedelta | None = None,
    steps: int | None = None,
    latency: str | datetime.timedelta | None = None,
) -> Experiment:
    """An experiment to use as ``with limit(...) as exp:`` (or ``exp = limit(...).start()`` ... ``exp.stop()``).

    ``cpu="1000m..100m", over="5m", steps=10``: a stepped profile, run by the agent (node-local).
    ``latency="20ms"`` (with ``bandwidth``): each shaped direction queues at most that long (default 50ms).

    Checked now (UsageError, nothing sent); applied when the block is entered; reverted when it is
    left. ``duration`` (default ``DEFAULT_DURATION_S``) is how long the agent keeps the change if
    this process cannot revert it. ``namespace`` defaults to the kubeconfig context's ("default"
    node-locally); ``container`` to the pod's only (or default) one. ``timeout`` bounds each backend
    call (default 30s).
    """
    req, conn = build_request(
        pod, namespace=namespace, container=container, selector=selector, cpu=cpu, memory=memory,
        bandwidth=bandwidth, direction=direction,
        duration=duration if duration is not None else format_duration(DEFAULT_DURATION_S),
        method=method, force=force, agent_address=agent_address, kubeconfig=kubeconfig, context=context,
        timeout=timeout, over=over, steps=steps, latency=latency)
    return Experiment(req, conn)


def _run(conn: Connection, action: Callable[[Backend], object], open_backend: Opener):
    backend = open_backend(conn)
    try:
        return action(backend)
    finally:
        backend.close()


def apply(
    pod: str | None = None,
    *,
    namespace: str | None = None,
    container: str | None = None,
    selector: str | None = None,
    cpu: Quantity | None = None,
    memory: Quantity | None = None,
    bandwidth: Quantity | None = None,
    direction: str = "both",
    duration: str | datetime.timedelta | None = None,
    method: str = "auto",
    force: bool = False,
    dry_run: bool = False,
    agent_address: str | None = None,
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    timeout: str | datetime.timedelta | None = None,
    open_backend: Opener = backends.open_backend,
    latency: str | datetime.timedelta | None = None,
) -> ApplyResult:
    """``kubectl-chaos --set-...`` as a function: apply and return what was read back; nothing reverts it
    but :func:`reset` or ``duration`` (none by default, as the CLI). Raises :class:`ApplyFailed` (with
    the result) when some targets of a selector failed; the others stay changed."""
    req, conn = build_request(
        pod, namespace=namespace, container=container, selector=selector, cpu=cpu, memory=memory,
        bandwidth=bandwidth, direction=direction, duration=duration, method=method, force=force, dry_run=dry_run,
        agent_address=agent_address, kubeconfig=kubeconfig, context=context, timeout=timeout, latency=latency)

    def send(backend: Backend) -> ApplyResult:
        request = req if req.namespace is not None else dataclasses.replace(req, namespace=backend.default_namespace())
        return backend.apply(request)

    result = _run(conn, send, open_backend)
    if not result.ok:
        raise ApplyFailed(f"could not change {_failures(result)}", result)
    return result


def reset(
    pod: str | None = None,
    *,
    namespace: str | None = None,
    container: str | None = None,
    selector: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    agent_address: str | None = None,
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    timeout: str | datetime.timedelta | None = None,
    open_backend: Opener = backends.open_backend,
) -> ResetResult:
    """``kubectl-chaos --reset`` as a function: restore the originals; raises :class:`RevertFailed` when a
    target could not be put back exactly."""
    req, conn = build_request(
        pod, namespace=namespace, container=container, selector=selector, force=force, dry_run=dry_run, reset=True,
        agent_address=agent_address, kubeconfig=kubeconfig, context=context, timeout=timeout)

    def send(backend: Backend) -> ResetResult:
        nonlocal req
        if req.namespace is None:
            req = dataclasses.replace(req, namespace=backend.default_namespace())
        return backend.reset(req)

    result = _run(conn, send, open_backend)
    error = _failures(result) or ("" if result.dry_run else _inexact(result))
    if error:
        raise RevertFailed(f"could not revert {req.target}: {error}", [t for t in result.targets if t.error])
    return result


def status(
    namespace: str | None = None,
    *,
    all_namespaces: bool = False,
    agent_address: str | None = None,
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    timeout: str | datetime.timedelta | None = None,
    open_backend: Opener = backends.open_backend,
) -> tuple[ExperimentStatus, ...]:
    """``kubectl-chaos status`` as a function: the active experiments in ``namespace`` (default: the
    context's), or in every namespace with ``all_namespaces=True``."""
    if namespace is not None and all_namespaces:
        raise UsageError("give namespace= or all_namespaces=True, not both")
    try:
        check_namespace(_name("namespace", namespace))
        conn = build_connection(_name("agent_address", agent_address), _path("kubeconfig", kubeconfig),
                                _name("context", context), _seconds_text("timeout", timeout))
    except UsageError as err:
        raise UsageError(_api_words(str(err))) from None

    def query(backend: Backend) -> tuple[ExperimentStatus, ...]:
        return tuple(backend.status(None if all_namespaces else namespace or backend.default_namespace()))

    return _run(conn, query, open_backend)
