"""Endpoint resolution: argument, then CONTAINER_RUNTIME_ENDPOINT, then sockets under a root."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from cri_api import RuntimeUnreachable
from cri_api.endpoint import DEFAULT_SOCKETS, resolve, socket_path, to_target


@pytest.fixture
def host_root(tmp_path):
    """A fake host root where a CRI-O socket exists (a real listening unix socket)."""
    path = tmp_path / "var/run/crio/crio.sock"
    path.parent.mkdir(parents=True)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    yield tmp_path
    sock.close()


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("/run/containerd/containerd.sock", "unix:///run/containerd/containerd.sock"),
        ("unix:///run/containerd/containerd.sock", "unix:///run/containerd/containerd.sock"),
        ("unix://run/x.sock", "unix:///run/x.sock"),
        ("localhost:1234", "localhost:1234"),
    ],
)
def test_to_target(given, target):
    assert to_target(given) == target


def test_socket_path():
    assert socket_path("unix:///run/x.sock") == "/run/x.sock"
    assert socket_path("localhost:1234") is None


def test_argument_wins_over_environment(host_root):
    env = {"CONTAINER_RUNTIME_ENDPOINT": "unix:///env.sock"}
    assert resolve("/arg.sock", env=env, host_root=str(host_root)) == ("unix:///arg.sock", ())


def test_environment_wins_over_detection(host_root):
    env = {"CONTAINER_RUNTIME_ENDPOINT": "unix:///env.sock"}
    assert resolve(None, env=env, host_root=str(host_root)) == ("unix:///env.sock", ())


def test_detection_finds_the_socket_under_the_host_root(host_root):
    target, tried = resolve(None, env={}, host_root=str(host_root))
    assert target == f"unix://{host_root}/var/run/crio/crio.sock"
    assert tried[0] == f"{host_root}/run/containerd/containerd.sock"


def test_a_regular_file_is_not_a_socket(tmp_path):
    fake = tmp_path / "run/containerd/containerd.sock"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    with pytest.raises(RuntimeUnreachable) as err:
        resolve(None, env={}, host_root=str(tmp_path))
    assert err.value.tried == tuple(f"{tmp_path}{p}" for p in DEFAULT_SOCKETS)
    message = str(err.value)
    assert "CONTAINER_RUNTIME_ENDPOINT is not set" in message
    for path in DEFAULT_SOCKETS:
        assert f"{tmp_path}{path}" in message


def test_importing_cri_api_does_not_import_grpc():
    code = "import sys, cri_api; cri_api.LinuxResources(); print('grpc' in sys.modules, 'google.protobuf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("containerd.sock", "unix://{cwd}/containerd.sock"),
        ("run/x.sock", "unix://{cwd}/run/x.sock"),
        ("unix:run/x.sock", "unix://{cwd}/run/x.sock"),
        ("unix:/run/x.sock", "unix:///run/x.sock"),
        ("dns:///cri.example:1234", "dns:///cri.example:1234"),
        ("node-1.example:1234", "node-1.example:1234"),
    ],
)
def test_a_path_without_scheme_is_a_unix_socket_relative_to_the_working_directory(given, target, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert to_target(given) == target.format(cwd=tmp_path)
    assert resolve(given, env={}) == (target.format(cwd=tmp_path), ())
