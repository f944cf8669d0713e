"""The floor under the agent's own share (issue #12): one Python gRPC round trip on a unix socket.

The agent's own share (bench_agent.py: its Apply as a client sees it, minus the bare runtime call)
includes one call to a Python gRPC server. This measures that call alone, with nothing behind it: a
grpc.health Check answered at once, by a server in a process of its own (as the agent is), from a
sync client in this process (as kubectl-chaos and the bench are), for three server shapes:

- ``sync``: ``grpc.server`` with a thread pool, as the agent serves (the poller thread hands each
  call to a worker);
- ``aio``: ``grpc.aio.server``, the handler run on the event loop (no hand-off; an engine call made
  there would block every other call for the runtime's ~7 ms);
- ``aio+executor``: ``grpc.aio.server`` whose handler runs in a thread pool (what an asyncio agent
  would have to do with a blocking engine).

Not a goal: the figures say how much of the 1.0 ms goal the transport alone takes, and whether
another server shape would lower it. Interleaved round by round, so all three see the same machine.

    .venv/bin/python bench/bench_grpc_floor.py [--calls 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SHAPES = ("sync", "aio", "aio+executor")
_SERVING = health_pb2.HealthCheckResponse.SERVING


class _Sync(health_pb2_grpc.HealthServicer):
    def Check(self, request, context):  # noqa: N802
        return health_pb2.HealthCheckResponse(status=_SERVING)


class _Aio(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):  # noqa: N802
        return health_pb2.HealthCheckResponse(status=_SERVING)


class _AioExecutor(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.pool = futures.ThreadPoolExecutor(max_workers=4)

    async def Check(self, request, context):  # noqa: N802
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: health_pb2.HealthCheckResponse(status=_SERVING))


def serve(shape: str, socket_path: str) -> None:
    """The server process: serves until killed; prints "ready" once it listens."""
    if shape == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        health_pb2_grpc.add_HealthServicer_to_server(_Sync(), server)
        server.add_insecure_port(f"unix://{socket_path}")
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(_Aio() if shape == "aio" else _AioExecutor(), server)
        server.add_insecure_port(f"unix://{socket_path}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def round_trips_ms(stub, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="calls per shape and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", choices=SHAPES, help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.socket)
        return 0

    work = pathlib.Path(tempfile.mkdtemp(prefix="kcx-grpc-floor-", dir="/tmp"))
    servers, stubs, channels = [], {}, []
    try:
        for shape in SHAPES:
            sock = work / f"{shape.replace('+', '-')}.sock"
            proc = subprocess.Popen([sys.executable, __file__, "--serve", shape, "--socket", str(sock)],
                                    stdout=subprocess.PIPE, text=True)
            servers.append(proc)
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"bench_grpc_floor: the {shape} server did not start")
            channel = grpc.insecure_channel(f"unix://{sock}")
            channels.append(channel)
            stubs[shape] = health_pb2_grpc.HealthStub(channel)
            round_trips_ms(stubs[shape], 100)  # connected and warm
        seen: dict[str, list[float]] = {shape: [] for shape in SHAPES}
        for _ in range(args.rounds):
            for shape in SHAPES:
                seen[shape] += round_trips_ms(stubs[shape], args.calls)
    finally:
        for channel in channels:
            channel.close()
        for proc in servers:
            proc.kill()
            proc.wait()
        for f in work.iterdir():
            f.unlink()
        work.rmdir()

    sync_p50 = pct(seen["sync"], 50)
    print(f"One gRPC health round trip on a unix socket, sync client, server in its own process "
          f"({args.rounds} rounds x {args.calls} calls, interleaved; Python {sys.version.split()[0]}, "
          f"grpcio {grpc.__version__}, {os.cpu_count()} CPUs):")
    print(f"{'server':<16}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'vs sync':>9}")
    for shape in SHAPES:
        v = seen[shape]
        print(f"{shape:<16}{pct(v, 50):9.3f}{pct(v, 99):9.3f}{statistics.fmean(v):9.3f}{pct(v, 50) / sync_p50:8.2f}x")
    print(f"(the agent serves sync: {sync_p50:.2f} ms of the own-share goal's 1.0 ms is this round trip alone)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
