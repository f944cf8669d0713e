"""The same without pytest: hold 200m of CPU on the demo pods while a load runs, then put it back.

    python load_under_limit.py [URL]     (default: a port-forward you started, http://127.0.0.1:8080/cgi-bin/work)

The limit is reverted when the block ends, when the load raises, on Ctrl-C and on SIGTERM; if this
process is killed outright, the agents revert it after ``duration``.
"""

from __future__ import annotations

import sys
import time
import urllib.request

from plugin.api import limit

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/cgi-bin/work"

with limit(selector="app=slow", namespace="demo", context="kind-chaos", cpu="200m", duration="2m") as exp:
    for target in exp.targets:
        print(f"{target.pod}: cpu {exp.original('cpu', target.pod)}m -> {exp.read_back('cpu', target.pod)}m")
    served, deadline = 0, time.monotonic() + 20
    while time.monotonic() < deadline:
        urllib.request.urlopen(URL, timeout=30).read()
        served += 1
    print(f"{served / 20:.1f} requests/s at 200m")
print("limits restored")
