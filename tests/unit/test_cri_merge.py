"""merge_resources: only asked fields change, zeros and out-of-range values are refused."""

from __future__ import annotations

import pytest

from cri_api import UNLIMITED, HugepageLimit, InvalidRequest, LinuxResources, merge_resources

KUBELET_STYLE = LinuxResources(
    cpu_period_us=100_000,
    cpu_quota_us=50_000,
    cpu_shares=512,
    memory_limit_bytes=64 << 20,
    memory_swap_limit_bytes=64 << 20,
    oom_score_adj=937,
    cpuset_cpus="0-1",
    cpuset_mems="0",
    hugepage_limits=(HugepageLimit("2MB", 0), HugepageLimit("1GB", 0)),
    unified={"memory.high": "60000000"},
)


def test_cpu_change_keeps_every_other_field():
    merged = merge_resources(KUBELET_STYLE, cpu_quota_us=20_000)
    assert merged == LinuxResources(**{**KUBELET_STYLE.__dict__, "cpu_quota_us": 20_000})


def test_nothing_asked_is_identity():
    assert merge_resources(KUBELET_STYLE) == KUBELET_STYLE


def test_swap_follows_memory_when_they_were_equal():
    merged = merge_resources(KUBELET_STYLE, memory_limit_bytes=128 << 20)
    assert (merged.memory_limit_bytes, merged.memory_swap_limit_bytes) == (128 << 20, 128 << 20)
    assert merged.cpu_quota_us == 50_000


def test_swap_kept_when_it_allows_swap_and_stays_above_memory():
    current = LinuxResources(memory_limit_bytes=64 << 20, memory_swap_limit_bytes=256 << 20)
    merged = merge_resources(current, memory_limit_bytes=128 << 20)
    assert merged.memory_swap_limit_bytes == 256 << 20


def test_memory_above_swap_is_refused_with_both_values():
    current = LinuxResources(memory_limit_bytes=64 << 20, memory_swap_limit_bytes=96 << 20)
    with pytest.raises(InvalidRequest, match=r"memory_limit_bytes=134217728 is above memory_swap_limit_bytes=100663296"):
        merge_resources(current, memory_limit_bytes=128 << 20)


def test_memory_and_swap_given_together():
    merged = merge_resources(KUBELET_STYLE, memory_limit_bytes=32 << 20, memory_swap_limit_bytes=48 << 20)
    assert (merged.memory_limit_bytes, merged.memory_swap_limit_bytes) == (32 << 20, 48 << 20)


def test_unset_swap_stays_unset():
    merged = merge_resources(LinuxResources(memory_limit_bytes=64 << 20), memory_limit_bytes=32 << 20)
    assert merged.memory_swap_limit_bytes is None


def test_unlimited_memory_follows_into_swap():
    merged = merge_resources(KUBELET_STYLE, memory_limit_bytes=UNLIMITED)
    assert (merged.memory_limit_bytes, merged.memory_swap_limit_bytes) == (UNLIMITED, UNLIMITED)


def test_unlimited_memory_under_finite_swap_is_refused():
    current = LinuxResources(memory_limit_bytes=64 << 20, memory_swap_limit_bytes=96 << 20)
    with pytest.raises(InvalidRequest, match="above memory_swap_limit_bytes"):
        merge_resources(current, memory_limit_bytes=UNLIMITED)


def test_unlimited_cpu_quota_is_accepted():
    assert merge_resources(KUBELET_STYLE, cpu_quota_us=UNLIMITED).cpu_quota_us == UNLIMITED


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cpu_quota_us", 0, r"cpu_quota_us=0 is not accepted: give a value >= 1000 or cri_api.UNLIMITED \(-1\) \(0 would mean"),
        ("cpu_quota_us", 999, r"cpu_quota_us=999 is not accepted: give a value >= 1000"),
        ("cpu_quota_us", -2, r"cpu_quota_us=-2 is not accepted"),
        ("cpu_period_us", 0, r"cpu_period_us=0 is not accepted: give 1000..1000000 us"),
        ("cpu_period_us", 1_000_001, r"cpu_period_us=1000001 is not accepted"),
        ("cpu_period_us", UNLIMITED, r"cpu_period_us=-1 is not accepted"),
        ("memory_limit_bytes", 0, r"memory_limit_bytes=0 is not accepted: give a value >= 1"),
        ("memory_swap_limit_bytes", 0, r"memory_swap_limit_bytes=0 is not accepted"),
        ("cpu_shares", 0, r"cpu_shares=0 is not accepted: give 2..262144"),
        ("cpu_shares", 1, r"cpu_shares=1 is not accepted"),
        ("cpu_quota_us", True, r"cpu_quota_us=True is not an integer"),
        ("memory_limit_bytes", 1.5, r"memory_limit_bytes=1.5 is not an integer"),
        ("memory_limit_bytes", "64Mi", r"memory_limit_bytes='64Mi' is not an integer"),
    ],
)
def test_invalid_values_are_refused_by_name_value_and_accepted_range(field, value, message):
    with pytest.raises(InvalidRequest, match=message):
        merge_resources(KUBELET_STYLE, **{field: value})


def test_invalid_request_is_also_a_value_error():
    with pytest.raises(ValueError):
        merge_resources(KUBELET_STYLE, cpu_quota_us=0)


def test_resources_round_trip_through_dict():
    data = KUBELET_STYLE.to_dict()
    assert data["hugepage_limits"] == [{"page_size": "2MB", "limit_bytes": 0}, {"page_size": "1GB", "limit_bytes": 0}]
    assert LinuxResources.from_dict(data) == KUBELET_STYLE


def test_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown LinuxResources fields \['cpu_quota'\]"):
        LinuxResources.from_dict({"cpu_quota": 1})
