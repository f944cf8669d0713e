"""``chaos-agent``: the node's experiment engine behind a gRPC API.

    chaos-agent [--cri-endpoint EP] [--listen unix:///run/kubectl-chaos/agent.sock]
                [--state-dir /var/lib/kubectl-chaos] [--node-name NAME] [--proc-root /proc]
                [--cgroup-root /sys/fs/cgroup] [--deny-namespaces kube-system,NS]
                [--metrics-address :9464] [--log-format text|json]

On start it recovers the state directory (reverting what expired while it was down), then
serves until SIGTERM or SIGINT. Experiments stay in force across its restarts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

# The engine forks helpers (pyroute2 enters pod network namespaces that way); gRPC's fork handlers
# make those children crash now and then (SIGSEGV), and they have no use here.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

DEFAULT_LISTEN = "unix:///run/kubectl-chaos/agent.sock"
DEFAULT_STATE_DIR = "/var/lib/kubectl-chaos"

log = logging.getLogger("chaos-agent")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _default_deny() -> str:
    own = os.environ.get("POD_NAMESPACE", "")
    return ",".join(ns for ns in ("kube-system", own) if ns)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chaos-agent", description="Change running containers' limits on this node.")
    p.add_argument("--cri-endpoint", default=None, help="CRI socket (default: $CONTAINER_RUNTIME_ENDPOINT or auto-detect)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="unix:///path (mode 0600) or host:port with --tls-*")
    p.add_argument("--tls-cert", help="server certificate chain (PEM), for a TCP --listen")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that signs the client certificates")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""))
    p.add_argument("--proc-root", default="/proc", help="the host's /proc (e.g. /host/proc in a pod)")
    p.add_argument("--cgroup-root", default="/sys/fs/cgroup", help="the host's cgroup mount")
    p.add_argument("--deny-namespaces", default=_default_deny(),
                   help="comma-separated namespaces never touched (default: kube-system and $POD_NAMESPACE)")
    p.add_argument("--metrics-address", default="", help="host:port for Prometheus metrics (default: off)")
    p.add_argument("--node-local-api", choices=("on", "off"), default="on",
                   help="serve Apply/Revert/List on --listen (default on); off: grpc health only, as cluster"
                        " installs run it (requests come through the Kubernetes API and its RBAC)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--drift-interval", type=float, default=3.0, help="seconds between drift checks")
    p.add_argument("--retry-max", type=float, default=60.0,
                   help="longest wait in seconds between tries of a restore that failed (backoff from 1 s doubles up to it)")
    p.add_argument("--no-sweep-orphans", dest="sweep_orphans", action="store_false",
                   help="at start, leave IFB devices of ours that no experiment owns (default: delete them)")
    controller = _controller_module()
    if controller is not None:
        controller.add_arguments(p)
    args = p.parse_args(argv)
    if args.drift_interval <= 0:
        p.error(f"--drift-interval {args.drift_interval} must be > 0")
    if not 1.0 <= args.retry_max <= 3600:
        p.error(f"--retry-max {args.retry_max} must be 1 to 3600 seconds")
    from daemonset.server import unix_path

    if unix_path(args.listen) is None and not (args.tls_cert and args.tls_key and args.tls_client_ca):
        p.error(f"--listen {args.listen} is TCP: it needs --tls-cert, --tls-key and --tls-client-ca (client certificates)")
    return args


def _controller_module():
    """The cluster-mode front door (daemonset.controller), when this build has it."""
    import importlib

    try:
        return importlib.import_module("daemonset.controller")
    except ModuleNotFoundError as e:
        if e.name != "daemonset.controller":
            raise
        return None


def _split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]") or "0.0.0.0", int(port)
    except ValueError:
        raise SystemExit(f"chaos-agent: --metrics-address {address!r} is not host:port") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_format, args.log_level)

    from cri_api import CRIError, RuntimeClient
    from daemonset.engine import Engine
    from daemonset.metrics import Metrics
    from daemonset.server import ListenError, serve
    from daemonset.types import EngineError

    try:
        cri = RuntimeClient(args.cri_endpoint)
    except CRIError as e:
        # Auto-detection found no runtime socket at all: nothing tells which runtime to wait for.
        log.error("no container runtime: %s (give --cri-endpoint to start and wait for it)", e)
        return 1
    try:
        version = cri.version()
        log.info("runtime %s %s at %s", version.runtime_name, version.runtime_version, cri.endpoint)
    except CRIError as e:
        # Serve what can be served without it (status, bandwidth resets, the kernel side of a restore);
        # the supervisor retries the rest with backoff until the runtime answers.
        log.warning("the runtime at %s does not answer yet (%s); starting anyway", cri.endpoint, e)

    # Loaded now rather than on the first request that needs them (pyroute2 alone takes ~0.1 s).
    import cgroupctl  # noqa: F401
    import netshape  # noqa: F401

    metrics = Metrics()
    cri.observe_call = metrics.observe_runtime_call
    engine = Engine(
        cri,
        cgroup_root=args.cgroup_root,
        proc_root=args.proc_root,
        state_dir=args.state_dir,
        node_name=args.node_name,
        deny_namespaces=tuple(ns.strip() for ns in args.deny_namespaces.split(",") if ns.strip()),
        metrics=metrics,
        drift_interval_s=args.drift_interval,
        sweep_orphan_ifbs=args.sweep_orphans,
        backoff_max_s=args.retry_max,
    )
    try:
        engine.start()
    except EngineError as e:
        log.error("%s", e)
        return 1

    if args.metrics_address:
        from prometheus_client import start_http_server

        host, port = _split_hostport(args.metrics_address)
        start_http_server(port, addr=host, registry=metrics.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    tls = None
    if args.tls_cert:
        with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k, open(args.tls_client_ca, "rb") as ca:
            tls = (c.read(), k.read(), ca.read())
    try:
        server = serve(engine, args.listen, tls=tls, node_local_api=args.node_local_api == "on")
    except ListenError as e:
        log.error("%s", e)
        engine.close()
        return 1

    controller = None
    module = _controller_module()
    wants_cluster = getattr(args, "kubernetes", "off") == "on" or (
        getattr(args, "kubernetes", "off") == "auto"
        and (getattr(args, "kubeconfig", None) or os.environ.get("KUBERNETES_SERVICE_HOST")))
    # Node-local only (no API to talk to): skip even importing the Kubernetes client (~20 MiB, 0.5 s).
    if module is not None and wants_cluster:
        try:
            controller = module.start_from_args(engine, args)
        except module.ControllerError as e:
            log.error("%s", e)
            server.stop(grace=0)
            engine.close()
            return 1

    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping (experiments stay in force and on disk)", signum)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    if controller is not None:
        controller.stop()
    server.stop(grace=2).wait()
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
