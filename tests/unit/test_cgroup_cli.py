"""python -m cgroupctl on a copy of a fixture tree: show, plan, set, restore; errors as one line."""

from __future__ import annotations

import json
import pathlib
import shutil

from cgroupctl.__main__ import main

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "cgroup"


def test_show_set_restore_round_trip(tmp_path, capsys):
    shutil.copytree(FIXTURES / "v1-cgroupfs-containerd", tmp_path / "t", symlinks=True)
    roots = ["--pid", "4242", "--proc-root", str(tmp_path / "t" / "proc"),
             "--cgroup-root", str(tmp_path / "t" / "sys" / "fs" / "cgroup")]
    assert main(["show", *roots]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["limits"]["cpu_quota_us"] == 50000 and shown["usage"]["memory_unreclaimable_bytes"] == 30 << 20

    assert main(["set", *roots, "--cpu-quota-us", "max"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["limits"]["cpu_quota_us"] == "unlimited"
    saved = tmp_path / "saved.json"
    saved.write_text(out)
    assert main(["restore", str(saved)]) == 0
    capsys.readouterr()
    assert main(["show", *roots]) == 0
    assert json.loads(capsys.readouterr().out)["limits"] == shown["limits"]


def test_errors_are_one_line_with_status_1(tmp_path, capsys):
    shutil.copytree(FIXTURES / "v2-cgroupfs-containerd", tmp_path / "t", symlinks=True)
    code = main(["plan", "--pid", "4242", "--proc-root", str(tmp_path / "t" / "proc"),
                 "--cgroup-root", str(tmp_path / "t" / "sys" / "fs" / "cgroup"), "--memory-bytes", "1000"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("cgroupctl: memory limit 1000 bytes") and err.count("\n") == 1
