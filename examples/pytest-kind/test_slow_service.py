"""The demo service under 200m of CPU instead of 1: does it still answer within its SLO?

``chaos.limit`` changes the running pods' CPU limit in place (no restart) and returns once every
chaos-agent has read the new limit back; the test's teardown puts the originals back, also when
the test fails.
"""

from __future__ import annotations

import statistics
import time
import urllib.request

SLO_S = 1.0


def response_time(url: str) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=30) as response:
        response.read()
    return time.monotonic() - started


def median_response(url: str, n: int = 5) -> float:
    return statistics.median(response_time(url) for _ in range(n))


def test_answers_within_the_slo_with_200m_of_cpu(chaos, slow_url):
    at_one_cpu = median_response(slow_url)

    exp = chaos.limit(selector="app=slow", cpu="200m")  # every replica
    assert [c.read_back for t in exp.targets for c in t.changes] == [200] * len(exp.targets)

    at_200m = median_response(slow_url)
    print(f"median response: {at_one_cpu * 1000:.0f} ms at 1 CPU, {at_200m * 1000:.0f} ms at 200m")
    assert at_200m > at_one_cpu  # the limit bites: the handler is throttled
    assert at_200m < SLO_S


def test_only_part_of_a_test_under_the_limit(chaos, slow_url):
    with chaos.limit(selector="app=slow", cpu="100m") as exp:
        assert exp.active
        under = median_response(slow_url, n=3)
    after = median_response(slow_url, n=3)  # the block's end reverted it
    assert after < under
