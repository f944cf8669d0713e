"""The installed ``kubectl-chaos`` executable in a subprocess: exit status, exact stderr, no traceback,
no heavy imports on the fast paths, and bash completion through a real bash."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.support.require import require

BIN = pathlib.Path(sys.executable).parent
EXE = BIN / "kubectl-chaos"


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    require(EXE.exists(), f"the installed kubectl-chaos entry point at {EXE} (pip install -e .)")
    home = tmp_path / "home"
    home.mkdir()
    return {
        **{k: v for k, v in os.environ.items() if k in ("CI", "LANG", "LC_ALL", "TMPDIR")},
        "PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(home),
        "KUBECONFIG": str(home / "no-such-kubeconfig"),
    }


def run(env: dict[str, str], *args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = [sys.executable, *python_flags, str(EXE), *args] if python_flags else [str(EXE), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def imported_modules(stderr: str) -> set[str]:
    """Top-level package names from ``python -X importtime`` lines."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_bad_value_exits_2_with_one_line(env):
    proc = run(env, "web", "--set-cpu", "abc")
    assert proc.returncode == 2
    assert proc.stderr == (
        'error: --set-cpu: "abc" is not a CPU quantity; use millicores like 500m or cores like 0.5 or 2\n'
    )
    assert proc.stdout == ""


def test_missing_pod_exits_2_with_one_line(env):
    proc = run(env, "--set-memory", "1Gi", "--reset")
    assert proc.returncode == 2
    assert proc.stderr == "error: missing POD: name the pod to change (or --selector for many); to list experiments run \"kubectl-chaos status\"\n"


def test_help_exits_0_without_heavy_imports(env):
    proc = run(env, "--help", python_flags=("-X", "importtime"))
    assert proc.returncode == 0
    assert proc.stdout.startswith("Usage: kubectl-chaos [OPTIONS] POD\n")
    modules = imported_modules(proc.stderr)
    assert "click" in modules  # the measurement works
    assert not modules & {"kubernetes", "grpc", "yaml", "google"}, sorted(modules)


def test_node_local_path_never_imports_kubernetes(env, tmp_path):
    # Whatever the agent backend does with an unreachable socket, it is one line and exit 1,
    # and the Kubernetes client (0.45 s) is not loaded.
    socket = tmp_path / "no-agent.sock"
    proc = run(env, "web", "--set-cpu", "500m", "--agent-address", f"unix://{socket}", "--timeout", "2s",
               python_flags=("-X", "importtime"))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == "cpu 500m = 0.5 CPU (500 millicpu)\n"
    assert "kubernetes" not in imported_modules(proc.stderr)


def test_cluster_path_fails_cleanly_without_a_cluster(env):
    proc = run(env, "web", "--set-cpu", "500m", "--timeout", "3s", "-o", "json")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "cpu 500m = 0.5 CPU (500 millicpu)"
    assert len(lines) == 2 and lines[1].startswith("error: "), proc.stderr
    assert proc.stdout == ""


def test_completion_script_from_env_var(env):
    proc = subprocess.run([str(EXE)], env={**env, "_KUBECTL_CHAOS_COMPLETE": "bash_source"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "complete -o nosort -F _kubectl_chaos_completion kubectl-chaos" in proc.stdout


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("kubectl-chaos st", 1, ["status"]),
        ("kubectl-chaos web --set-c", 2, ["--set-cpu"]),
        ("kubectl-chaos web --method c", 3, ["cri", "cgroup"]),
        ("kubectl-chaos status -o y", 3, ["yaml"]),
    ],
)
def test_bash_completion_through_bash(env, words, cword, expected):
    bash = shutil.which("bash")
    require(bash is not None, "bash")
    script = (
        'source <(kubectl-chaos completion bash)\n'
        f'COMP_WORDS=({words}); COMP_CWORD={cword}\n'
        '_kubectl_chaos_completion kubectl-chaos\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run([bash, "--norc", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected


def test_cobra_complete_word_answers_like_kubectl_complete_chaos(env):
    # The usual kubectl_complete-<plugin> wrapper scripts run "kubectl <plugin> __complete ARGS".
    proc = run(env, "__complete", "web", "--direction", "")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "egress\ningress\nboth\n:4\n", "")
    direct = subprocess.run([str(BIN / "kubectl_complete-chaos"), "web", "--direction", ""], env=env,
                            capture_output=True, text=True, timeout=60)
    assert (direct.returncode, direct.stdout) == (0, proc.stdout)


def test_completion_answers_without_heavy_imports(env):
    # Every <TAB> runs a fresh process: keep it to click and the plugin's own modules.
    proc = subprocess.run([sys.executable, "-X", "importtime", str(BIN / "kubectl_complete-chaos"), "web", "--context", ""],
                          env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, ":4\n")
    modules = imported_modules(proc.stderr)
    assert "click" in modules
    assert not modules & {"kubernetes", "grpc", "google"}, sorted(modules)


def test_installed_command_loads_with_the_short_lived_gc_threshold_and_the_api_keeps_the_default(env):
    """The installed command sets the collector's threshold before it loads the command line
    (plugin.console); importing the command line or the Python API in a process of one's own
    leaves that process's collector as it was."""
    script = EXE.read_text()
    assert "from plugin.console import main" in script, script
    probe = ("import gc, plugin.console as c; before = gc.get_threshold(); cli = c._load_cli();"
             " print(before[0], gc.get_threshold()[0], cli.__name__)")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["700", "50000", "plugin.cli"]
    api = subprocess.run([sys.executable, "-c", "import gc, plugin.api, plugin.cli; print(gc.get_threshold()[0])"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert (api.returncode, api.stdout.strip()) == (0, "700"), api.stderr
    version = run(env, "--version")
    assert version.returncode == 0 and version.stdout.startswith("kubectl-chaos"), (version.stdout, version.stderr)
