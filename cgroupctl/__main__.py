"""``python -m cgroupctl``: look at and change a container's cgroup limits by hand (JSON out).

    python -m cgroupctl show --pid 1234
    python -m cgroupctl plan --cgroups-path kubepods-burstable-pod<uid>.slice:cri-containerd:<id> --cpu-quota-us 50000
    python -m cgroupctl set --pid 1234 --memory-bytes 268435456 > saved.json
    python -m cgroupctl restore saved.json

Exit status 0 on success, 1 with a one-line message on stderr for a cgroupctl error.
"""

from __future__ import annotations

import argparse
import json
import sys

from cgroupctl import (
    UNLIMITED,
    CgroupError,
    Limits,
    Snapshot,
    locate,
    plan,
    read_limits,
    read_state,
    read_usage,
    restore,
    set_limits,
)


def _limit(text: str):
    return UNLIMITED if text in ("max", "unlimited", "-1") else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cgroupctl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("show", "plan", "set"):
        p = sub.add_parser(name)
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--pid", type=int)
        where.add_argument("--cgroups-path")
        p.add_argument("--proc-root", default="/proc")
        p.add_argument("--cgroup-root", default="/sys/fs/cgroup")
        if name != "show":
            p.add_argument("--cpu-quota-us", type=_limit, help="microseconds per period, or 'max'")
            p.add_argument("--cpu-period-us", type=int)
            p.add_argument("--memory-bytes", type=_limit, help="bytes, or 'max'")
            p.add_argument("--force", action="store_true", help="allow a memory limit below unreclaimable usage")
    p = sub.add_parser("restore")
    p.add_argument("snapshot", help="a JSON file written by 'set' (its 'snapshot') or a bare snapshot")
    p.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "restore":
            with open(args.snapshot) as f:
                data = json.load(f)
            out = restore(Snapshot.from_dict(data.get("snapshot") or data), force=args.force).to_dict()
        else:
            cg = locate(pid=args.pid, cgroups_path=args.cgroups_path, proc_root=args.proc_root,
                        cgroup_root=args.cgroup_root)
            if args.command == "show":
                out = {"cgroups": cg.to_dict(), "limits": read_limits(cg).to_dict(),
                       "pod_limits": read_limits(cg, pod=True).to_dict() if cg.pod else None,
                       "usage": read_usage(cg).to_dict()}
            else:
                limits = Limits(cpu_quota_us=args.cpu_quota_us, cpu_period_us=args.cpu_period_us,
                                memory_limit_bytes=args.memory_bytes)
                if args.command == "plan":
                    out = plan(read_state(cg), limits, force=args.force).to_dict()
                else:
                    out = set_limits(cg, limits, force=args.force).to_dict()
    except (CgroupError, OSError, ValueError) as e:
        print(f"cgroupctl: {e}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
