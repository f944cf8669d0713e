"""Scenario driver run inside the VM: ``python3 -m guest.driver NAME``, prints one JSON line.

Each scenario performs its steps on real cgroup v2 files (by hand or through cgroupctl) and reports
what it read and measured; the host-side tests in tests/vm assert on that report.
"""

from __future__ import annotations

import sys
import traceback

from guest import kcxguest as g

SCENARIOS = {}
WINDOW_S = 1.5


def scenario(fn):
    SCENARIOS[fn.__name__.replace("_", "-")] = fn
    return fn


@scenario
def smoke_cpu():
    """cpu.max written by hand: read back and enforced on a busy loop, then lifted."""
    cg = g.make_cgroup("kcx-smoke")
    busy = None
    try:
        report = {}
        busy = g.start_busy(cg)
        for label, value in (("q30", "30000 100000"), ("q70", "70000 100000"), ("max", "max 100000")):
            g.write(cg / "cpu.max", value)
            report[label] = {"cpu_max": g.read(cg / "cpu.max"), "cpus": g.measure_cpu(cg, WINDOW_S)}
        return report
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        g.remove_cgroup(cg)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SCENARIOS:
        print(f"usage: python3 -m guest.driver {{{','.join(sorted(SCENARIOS))}}}", file=sys.stderr)
        return 2
    try:
        g.emit({"ok": True, "result": SCENARIOS[argv[0]]()})
    except Exception as e:
        traceback.print_exc()
        g.emit({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
