"""plugin.units: every accepted spelling and every refusal, with the exact one-line message."""

from __future__ import annotations

import pytest

from plugin.errors import UsageError
from plugin.units import (
    BANDWIDTH_MAX_BPS,
    BANDWIDTH_MIN_BPS,
    MEMORY_MAX_BYTES,
    MEMORY_MIN_BYTES,
    describe_bandwidth,
    describe_cpu,
    describe_duration,
    describe_memory,
    format_bandwidth,
    format_cpu,
    format_duration,
    format_memory,
    parse_bandwidth,
    parse_cpu,
    parse_duration,
    parse_memory,
)

Ki, Mi, Gi, Ti, Pi, Ei = (1024**n for n in range(1, 7))


def refused(parse, text: str) -> str:
    with pytest.raises(UsageError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert info.value.exit_code == 2
    return message


# --- CPU ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "millicpu"),
    [
        ("500m", 500),
        ("0.5", 500),
        ("2", 2000),
        ("1.5", 1500),
        ("100m", 100),
        ("10m", 10),
        ("1", 1000),
        ("1.001", 1001),
        ("0.25", 250),
        (".5", 500),
        ("2.", 2000),
        ("+1", 1000),
        (" 250m ", 250),
        ("1500m", 1500),
        ("1e0", 1000),
        ("0.1", 100),
        ("64", 64000),
        ("100000", 100_000_000),
    ],
)
def test_cpu_accepted(text, millicpu):
    assert parse_cpu(text) == millicpu


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", '--set-cpu: "abc" is not a CPU quantity; use millicores like 500m or cores like 0.5 or 2'),
        ("0", '--set-cpu: "0" is zero; a CPU limit must be at least 10m'),
        ("0m", '--set-cpu: "0m" is zero; a CPU limit must be at least 10m'),
        ("-0", '--set-cpu: "-0" is zero; a CPU limit must be at least 10m'),
        ("-1", '--set-cpu: "-1" is negative; use millicores like 500m or cores like 0.5 or 2'),
        ("-500m", '--set-cpu: "-500m" is negative; use millicores like 500m or cores like 0.5 or 2'),
        (
            "1e400",
            '--set-cpu: "1e400" is too large to be a CPU quantity; use millicores like 500m or cores like 0.5 or 2',
        ),
        ("inf", '--set-cpu: "inf" is not a CPU quantity; use millicores like 500m or cores like 0.5 or 2'),
        ("nan", '--set-cpu: "nan" is not a CPU quantity; use millicores like 500m or cores like 0.5 or 2'),
        ("1.0005", '--set-cpu: "1.0005" is finer than 1m (0.001 CPU); CPU limits are whole millicores'),
        ("0.5m", '--set-cpu: "0.5m" is finer than 1m (0.001 CPU); CPU limits are whole millicores'),
        (
            "2k",
            '--set-cpu: "2k" has unit "k"; CPU takes only m (millicores) or no unit (cores): '
            "use millicores like 500m or cores like 0.5 or 2",
        ),
        (
            "1Ki",
            '--set-cpu: "1Ki" has unit "Ki"; CPU takes only m (millicores) or no unit (cores): '
            "use millicores like 500m or cores like 0.5 or 2",
        ),
        (
            "500M",
            '--set-cpu: "500M" has unit "M"; CPU takes only m (millicores) or no unit (cores): '
            "use millicores like 500m or cores like 0.5 or 2",
        ),
        (
            "2 cores",
            '--set-cpu: "2 cores" has unit " cores"; CPU takes only m (millicores) or no unit (cores): '
            "use millicores like 500m or cores like 0.5 or 2",
        ),
        ("5m", '--set-cpu: "5m" is below 10m: the kernel\'s CFS quota is at least 1 ms per 100 ms period'),
        ("0.001", '--set-cpu: "0.001" is below 10m: the kernel\'s CFS quota is at least 1 ms per 100 ms period'),
        ("100001", '--set-cpu: "100001" is more than 100,000 cores; use millicores like 500m or cores like 0.5 or 2'),
        ("", "--set-cpu: empty value; use millicores like 500m or cores like 0.5 or 2"),
        ("   ", "--set-cpu: empty value; use millicores like 500m or cores like 0.5 or 2"),
        ("m", '--set-cpu: "m" is not a CPU quantity; use millicores like 500m or cores like 0.5 or 2'),
        ("1,5", '--set-cpu: "1,5" has unit ",5"; CPU takes only m (millicores) or no unit (cores): '
         "use millicores like 500m or cores like 0.5 or 2"),
        ("0x10", '--set-cpu: "0x10" has unit "x10"; CPU takes only m (millicores) or no unit (cores): '
         "use millicores like 500m or cores like 0.5 or 2"),
        ("١", '--set-cpu: "١" is not a CPU quantity; use millicores like 500m or cores like 0.5 or 2'),
        ("1.5e3m", '--set-cpu: "1.5e3m" has both an exponent and a unit; use millicores like 500m or cores like 0.5 or 2'),
    ],
)
def test_cpu_refused(text, message):
    assert refused(parse_cpu, text) == message


def test_cpu_huge_input_is_refused_without_work():
    message = refused(parse_cpu, "9" * 10_000)
    assert message.startswith('--set-cpu: "99999999999999999999..." is too long to be a CPU quantity')


def test_cpu_flag_name_is_the_callers():
    assert refused(lambda t: parse_cpu(t, "--cpu"), "x").startswith('--cpu: "x"')


# --- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n_bytes"),
    [
        ("2Gi", 2 * Gi),
        ("512Mi", 512 * Mi),
        ("1G", 10**9),
        ("1.5Gi", 1536 * Mi),
        ("1e9", 10**9),
        ("1E9", 10**9),
        ("128974848", 128974848),
        ("129e6", 129 * 10**6),
        ("4096Ki", 4 * Mi),
        ("4Mi", MEMORY_MIN_BYTES),
        ("1Ti", Ti),
        ("1Pi", Pi),
        ("1Ei", Ei),
        ("7Ei", 7 * Ei),
        ("5000k", 5 * 10**6),
        ("5M", 5 * 10**6),
        ("1T", 10**12),
        ("1P", 10**15),
        ("1E", 10**18),
        ("9E", 9 * 10**18),
        ("0.5Gi", 512 * Mi),
        ("9223372036854775807", MEMORY_MAX_BYTES),
        (" 64Mi ", 64 * Mi),
    ],
)
def test_memory_accepted(text, n_bytes):
    assert parse_memory(text) == n_bytes


_MEM = "use bytes or a suffix Ki Mi Gi Ti Pi Ei (powers of 1024) or k M G T P E (powers of 1000), like 512Mi or 2Gi"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", f'--set-memory: "0" is zero; {_MEM}'),
        ("0Gi", f'--set-memory: "0Gi" is zero; {_MEM}'),
        ("-1", f'--set-memory: "-1" is negative; {_MEM}'),
        ("-2Gi", f'--set-memory: "-2Gi" is negative; {_MEM}'),
        ("0.5", f'--set-memory: "0.5" is not a whole number of bytes; {_MEM}'),
        ("100000000.5", f'--set-memory: "100000000.5" is not a whole number of bytes; {_MEM}'),
        ("1.0000001Ki", f'--set-memory: "1.0000001Ki" is not a whole number of bytes; {_MEM}'),
        ("2GB", f'--set-memory: "2GB" has an unknown unit "GB"; {_MEM}'),
        ("2gi", f'--set-memory: "2gi" has an unknown unit "gi"; {_MEM}'),
        ("1K", f'--set-memory: "1K" has an unknown unit "K"; {_MEM}'),
        ("1MiB", f'--set-memory: "1MiB" has an unknown unit "MiB"; {_MEM}'),
        ("1e3Mi", f'--set-memory: "1e3Mi" has both an exponent and a unit; {_MEM}'),
        (
            "500m",
            '--set-memory: "500m" is in milli-bytes (m means 1/1000); use 500M (megabytes) or 500Mi (mebibytes)',
        ),
        ("abc", f'--set-memory: "abc" is not a memory quantity; {_MEM}'),
        ("Gi", f'--set-memory: "Gi" is not a memory quantity; {_MEM}'),
        ("inf", f'--set-memory: "inf" is not a memory quantity; {_MEM}'),
        ("1e400", f'--set-memory: "1e400" is too large to be a memory quantity; {_MEM}'),
        ("1e-400", f'--set-memory: "1e-400" is too small to be a memory quantity; {_MEM}'),
        ("8Ei", '--set-memory: "8Ei" is more than 2^63-1 bytes (8Ei), the largest limit the kernel takes'),
        (
            "9223372036854775808",
            '--set-memory: "9223372036854775808" is more than 2^63-1 bytes (8Ei), the largest limit the kernel takes',
        ),
        ("10E", '--set-memory: "10E" is more than 2^63-1 bytes (8Ei), the largest limit the kernel takes'),
        ("1Mi", '--set-memory: "1Mi" is below 4Mi (4,194,304 bytes): a container cannot even start with less'),
        (
            "4194303",
            '--set-memory: "4194303" is below 4Mi (4,194,304 bytes): a container cannot even start with less',
        ),
        ("1", '--set-memory: "1" is below 4Mi (4,194,304 bytes): a container cannot even start with less'),
        ("", f"--set-memory: empty value; {_MEM}"),
    ],
)
def test_memory_refused(text, message):
    assert refused(parse_memory, text) == message


# --- bandwidth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        # bits per second: "b" lower case
        ("2Mbps", 2_000_000),
        ("2Mbit", 2_000_000),
        ("2Mbit/s", 2_000_000),
        ("2Mb/s", 2_000_000),
        ("2Mb", 2_000_000),
        ("2mbit", 2_000_000),  # tc's spelling of megabits
        ("10kbps", 10_000),
        ("10Kbps", 10_000),
        ("500kbit", 500_000),
        ("1Gbps", 10**9),
        ("1Gbit", 10**9),
        ("1gbit", 10**9),
        ("9000bps", 9000),
        ("9000bit", 9000),
        # bytes per second: "B" upper case
        ("2MBps", 16_000_000),
        ("2MB/s", 16_000_000),
        ("2MB", 16_000_000),
        ("1kBps", 8000),
        ("1KB/s", 8000),
        ("1000Bps", 8000),
        ("1GB/s", 8 * 10**9),
        # Kubernetes bandwidth annotation style: bare suffixes are bits
        ("2M", 2_000_000),
        ("10k", 10_000),
        ("1G", 10**9),
        ("2Mi", 2 * 2**20),
        ("10Ki", 10 * 2**10),
        ("1Gi", 2**30),
        ("1Mibit", 2**20),
        ("1MiBps", 8 * 2**20),
        # plain numbers are bits per second
        ("8000", 8000),
        ("1000000", 10**6),
        ("1e6", 10**6),
        ("2.5Mbit", 2_500_000),
        ("0.008Mbit", 8000),
        (" 2Mbps ", 2_000_000),
        ("100Gbit", BANDWIDTH_MAX_BPS),
        ("8kbit", BANDWIDTH_MIN_BPS),
    ],
)
def test_bandwidth_accepted(text, bps):
    assert parse_bandwidth(text) == bps


_BW = "use bits/s like 2Mbps, 2Mbit, 500kbit, 1Gbps or 2M, or bytes/s like 2MBps or 2MB/s"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "2mbps",
            '--set-bandwidth: "2mbps" is ambiguous (tc reads mbps as megabytes/s); '
            "write 2Mbit for megabits/s or 2MBps for megabytes/s",
        ),
        (
            "1gbps",
            '--set-bandwidth: "1gbps" is ambiguous (tc reads gbps as gigabytes/s); '
            "write 1Gbit for gigabits/s or 1GBps for gigabytes/s",
        ),
        (
            "2m",
            '--set-bandwidth: "2m" is in milli-bits/s (m means 1/1000); write 2M or 2Mbit for megabits/s',
        ),
        ("0", '--set-bandwidth: "0" is zero; the slowest rate is 8kbit (1 kB/s)'),
        ("0Mbps", '--set-bandwidth: "0Mbps" is zero; the slowest rate is 8kbit (1 kB/s)'),
        ("-2M", f'--set-bandwidth: "-2M" is negative; {_BW}'),
        ("abc", f'--set-bandwidth: "abc" is not a bandwidth; {_BW}'),
        ("Mbps", f'--set-bandwidth: "Mbps" is not a bandwidth; {_BW}'),
        ("2MBPS", f'--set-bandwidth: "2MBPS" has an unknown unit "MBPS"; {_BW}'),
        ("2Mbyte", f'--set-bandwidth: "2Mbyte" has an unknown unit "Mbyte"; {_BW}'),
        ("2 Mbps", f'--set-bandwidth: "2 Mbps" has an unknown unit " Mbps"; {_BW}'),
        ("2Xbps", f'--set-bandwidth: "2Xbps" has an unknown unit "Xbps"; {_BW}'),
        ("1.5", f'--set-bandwidth: "1.5" is not a whole number of bits per second; {_BW}'),
        ("1e6Mbit", f'--set-bandwidth: "1e6Mbit" has both an exponent and a unit; {_BW}'),
        (
            "1k",
            '--set-bandwidth: "1k" is 1,000 bit/s, below the minimum of 8kbit (1 kB/s): '
            "slower links stall TCP instead of slowing it",
        ),
        (
            "7999",
            '--set-bandwidth: "7999" is 7,999 bit/s, below the minimum of 8kbit (1 kB/s): '
            "slower links stall TCP instead of slowing it",
        ),
        ("200Gbit", '--set-bandwidth: "200Gbit" is 200Gbit/s, above the maximum of 100Gbit/s'),
        ("1Tbit", '--set-bandwidth: "1Tbit" is 1000Gbit/s, above the maximum of 100Gbit/s'),
        ("13GBps", '--set-bandwidth: "13GBps" is 104Gbit/s, above the maximum of 100Gbit/s'),
        ("1e400", f'--set-bandwidth: "1e400" is too large to be a bandwidth; {_BW}'),
        ("inf", f'--set-bandwidth: "inf" is not a bandwidth; {_BW}'),
        ("", f"--set-bandwidth: empty value; {_BW}"),
    ],
)
def test_bandwidth_refused(text, message):
    assert refused(parse_bandwidth, text) == message


# --- durations ---------------------------------------------------------------------------------

_DUR = "use a number with h, m or s, like 30s, 5m, 1h30m or 1.5h"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("90s", 90.0),
        ("90m", 5400.0),
        ("1h0m1s", 3601.0),
        ("2m30s", 150.0),
        ("1.5s", 1.5),
        ("1s", 1.0),
        ("+10s", 10.0),
        ("8784h", 8784 * 3600.0),
    ],
)
def test_duration_accepted(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("90", '--duration: "90" has no unit; write 90s, 90m or 90h'),
        ("1.5", '--duration: "1.5" has no unit; write 1.5s, 1.5m or 1.5h'),
        ("0", f'--duration: "0" is zero; {_DUR}'),
        ("0s", f'--duration: "0s" is zero; {_DUR}'),
        ("0h0m0s", f'--duration: "0h0m0s" is zero; {_DUR}'),
        ("-5m", f'--duration: "-5m" is negative; {_DUR}'),
        ("-1", f'--duration: "-1" is negative; {_DUR}'),
        ("5d", f'--duration: "5d" has an unknown unit "d"; {_DUR}'),
        ("500ms", f'--duration: "500ms" has an unknown unit "ms"; {_DUR}'),
        ("10sec", f'--duration: "10sec" has an unknown unit "sec"; {_DUR}'),
        ("1h30", f'--duration: "1h30" is not a duration; {_DUR}'),
        ("30m1h", f'--duration: "30m1h" is not a duration; {_DUR}'),
        ("1h1h", f'--duration: "1h1h" is not a duration; {_DUR}'),
        ("abc", f'--duration: "abc" is not a duration; {_DUR}'),
        ("inf", f'--duration: "inf" is not a duration; {_DUR}'),
        ("0.5s", f'--duration: "0.5s" is shorter than 1s; {_DUR}'),
        ("8785h", f'--duration: "8785h" is longer than a year (8784h); {_DUR}'),
        ("", f"--duration: empty value; {_DUR}"),
    ],
)
def test_duration_refused(text, message):
    assert refused(parse_duration, text) == message


def test_duration_flag_name_is_the_callers():
    assert refused(lambda t: parse_duration(t, "--timeout"), "3").startswith('--timeout: "3" has no unit')


# --- formatting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("millicpu", "text"),
    [(500, "500m"), (1000, "1"), (2000, "2"), (1500, "1500m"), (10, "10m"), (None, "unlimited")],
)
def test_format_cpu(millicpu, text):
    assert format_cpu(millicpu) == text


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (2 * Gi, "2Gi"),
        (512 * Mi, "512Mi"),
        (1536 * Mi, "1536Mi"),
        (10**9, "1G"),
        (129 * 10**6, "129M"),
        (128974848, "123Mi"),
        (4 * Mi, "4Mi"),
        (Ei, "1Ei"),
        (1234567, "1234567"),
        (2000, "2k"),
        (None, "unlimited"),
    ],
)
def test_format_memory(n_bytes, text):
    assert format_memory(n_bytes) == text


@pytest.mark.parametrize(
    ("bps", "text"),
    [
        (2_000_000, "2Mbit/s"),
        (16_000_000, "16Mbit/s"),
        (1_500_000, "1.5Mbit/s"),
        (8000, "8kbit/s"),
        (8001, "8.001kbit/s"),
        (10**9, "1Gbit/s"),
        (100 * 10**9, "100Gbit/s"),
        (2 * 2**20, "2Mibit/s"),
        (123_456_789, "123.456789Mbit/s"),
        (999, "999bit/s"),
        (None, "unlimited"),
    ],
)
def test_format_bandwidth(bps, text):
    assert format_bandwidth(bps) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30, "30s"), (300, "5m"), (5400, "1h30m"), (3600, "1h"), (90, "1m30s"), (1.5, "1.5s"), (None, "none")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "text", ["500m", "0.5", "2", "1.5", "100m", "1001m", "64"]
)
def test_cpu_format_parses_back(text):
    assert parse_cpu(format_cpu(parse_cpu(text))) == parse_cpu(text)


@pytest.mark.parametrize("text", ["2Gi", "512Mi", "1G", "1.5Gi", "129e6", "128974848", "7Ei"])
def test_memory_format_parses_back(text):
    assert parse_memory(format_memory(parse_memory(text))) == parse_memory(text)


@pytest.mark.parametrize("text", ["2Mbps", "2MBps", "2Mi", "1.5Mbit", "8001", "100Gbit", "123456789"])
def test_bandwidth_format_parses_back(text):
    shown = format_bandwidth(parse_bandwidth(text))
    assert parse_bandwidth(shown) == parse_bandwidth(text)


@pytest.mark.parametrize("text", ["30s", "5m", "1h30m", "1.5h", "1m30s", "1.5s"])
def test_duration_format_parses_back(text):
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


def test_describe_lines():
    assert describe_cpu("500m", 500) == "cpu 500m = 0.5 CPU (500 millicpu)"
    assert describe_cpu("2", 2000) == "cpu 2 = 2 CPU (2,000 millicpu)"
    assert describe_memory("2Gi", 2 * Gi) == "memory 2Gi = 2,147,483,648 bytes"
    assert describe_bandwidth("2Mbps", 2_000_000) == "bandwidth 2Mbps = 2,000,000 bit/s (both directions)"
    assert (
        describe_bandwidth("2MBps", 16_000_000, "egress")
        == "bandwidth 2MBps = 16,000,000 bit/s (egress: out of the pod)"
    )
    assert (
        describe_bandwidth("2M", 2_000_000, "ingress")
        == "bandwidth 2M = 2,000,000 bit/s (ingress: into the pod)"
    )
    assert describe_duration("1h30m", 5400.0) == "duration 1h30m = 5,400 s"
    assert describe_duration("1.5s", 1.5) == "duration 1.5s = 1.5 s"
