"""plugin.backends.kubeclient: kubeconfig reading as kubectl does it, and HTTP/1.1 to the fake API
server over TLS (keep-alive, errors, watch streams, a server that closes idle connections)."""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import threading

import pytest
import yaml

from plugin.backends import kubeclient
from tests.support.fakeapi import FakeKubeAPI


@pytest.fixture(scope="module")
def api():
    with FakeKubeAPI() as server:
        server.add_namespace("shop")
        yield server


def write(path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def config(server: str = "https://127.0.0.1:6443", user: dict | None = None, cluster: dict | None = None,
           context: str = "main", namespace: str | None = None) -> dict:
    ctx = {"cluster": "c", "user": "u", **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
            "users": [{"name": "u", "user": user or {"token": "t"}}],
            "contexts": [{"name": context, "context": ctx}]}


def test_kubeconfig_files_merge_as_kubectl_merges_them(tmp_path, monkeypatch):
    first = config(namespace="shop")
    first["users"][0]["user"] = {"tokenFile": "token"}  # relative: to the file that names it
    (tmp_path / "token").write_text("from-file\n")
    second = config(server="https://other:1", context="second")
    second["current-context"] = "second"
    a, b = write(tmp_path / "a", first), write(tmp_path / "b", second)
    monkeypatch.setenv("KUBECONFIG", f"{a}{os.pathsep}{b}")
    cfg = kubeclient.KubeConfig()
    assert cfg.context == "main" and cfg.namespace == "shop"  # the first file's current-context
    assert cfg.server == "https://127.0.0.1:6443"  # cluster "c": the first file's wins
    assert cfg.user["tokenFile"] == str(tmp_path / "token")
    other = kubeclient.KubeConfig(context="second")
    assert other.namespace == "default"
    with pytest.raises(kubeclient.ConfigError, match=r"context 'nope' not found; contexts: main, second"):
        kubeclient.KubeConfig(context="nope")
    with pytest.raises(kubeclient.ConfigError, match="does not exist"):
        kubeclient.KubeConfig(str(tmp_path / "missing"))


def test_what_it_does_not_implement_is_left_to_the_kubernetes_package(tmp_path):
    path = write(tmp_path / "k", config(user={"auth-provider": {"name": "oidc"}}))
    with pytest.raises(kubeclient.Unsupported):
        kubeclient.KubeConfig(path)
    path = write(tmp_path / "p", config(cluster={"proxy-url": "http://proxy:3128"}))
    with pytest.raises(kubeclient.Unsupported):
        kubeclient.KubeConfig(path)


def client_for(api: FakeKubeAPI, tmp_path, **user) -> kubeclient.Client:
    cluster = {"certificate-authority-data": base64.b64encode(api.ca_pem).decode()}
    path = write(tmp_path / "kc", config(server=api.url, user=user or {"token": api.admin_token}, cluster=cluster))
    return kubeclient.Client(kubeclient.KubeConfig(path))


def test_requests_over_one_kept_alive_connection(api, tmp_path):
    client = client_for(api, tmp_path)
    before = len(api.requests)
    ns = client.request("GET", "/api/v1/namespaces/shop")
    assert ns["metadata"]["name"] == "shop"
    conn = client._conn
    created = client.request("POST", "/api/v1/namespaces/shop/pods", body={
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kc-1", "labels": {"a": "b c"}},
        "spec": {"containers": [{"name": "app"}]}})
    assert created["metadata"]["name"] == "kc-1"
    listed = client.request("GET", "/api/v1/namespaces/shop/pods", query={"labelSelector": "a in (x,y),a!=z"})
    assert listed["items"] == []
    patched = client.request("PATCH", "/api/v1/namespaces/shop/pods/kc-1", body={"metadata": {"labels": {"e": "f"}}},
                             content_type="application/merge-patch+json")
    assert patched["metadata"]["labels"] == {"a": "b c", "e": "f"}
    assert client._conn is conn  # one connection for all of them
    with pytest.raises(kubeclient.ApiError) as err:
        client.request("GET", "/api/v1/namespaces/shop/pods/nope")
    assert err.value.status == 404 and err.value.message == 'pods "nope" not found'
    assert [r.code for r in api.requests[before:]] == [200, 201, 200, 200, 404]
    client.request("DELETE", "/api/v1/namespaces/shop/pods/kc-1")
    client.close()


def test_a_watch_streams_lines_as_they_come(api, tmp_path):
    client = client_for(api, tmp_path)
    start = client.request("GET", "/api/v1/namespaces/shop/pods")["metadata"]["resourceVersion"]
    stream = client.request("GET", "/api/v1/namespaces/shop/pods", stream=True, timeout_s=10, query={
        "watch": "true", "resourceVersion": start, "timeoutSeconds": "5"})
    assert client._conn is None  # the watch took the connection
    threading.Timer(0.2, lambda: api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "kc-watch", "namespace": "shop"}, "spec": {"containers": [{"name": "app"}]}})).start()
    for line in stream.lines():
        event = json.loads(line)
        assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "kc-watch"
        break
    stream.close()
    assert client.request("GET", "/api/v1/namespaces/shop/pods/kc-watch")["metadata"]["name"] == "kc-watch"
    client.close()


def test_an_idle_connection_the_server_closed_is_replaced(api, tmp_path):
    client = client_for(api, tmp_path)
    client.request("GET", "/api/v1/namespaces/shop")
    client._conn.sock.shutdown(2)  # as a server that drops idle keep-alive connections
    assert client.request("GET", "/api/v1/namespaces/shop")["metadata"]["name"] == "shop"
    client.close()


def test_bad_credentials_and_untrusted_servers(api, tmp_path):
    with pytest.raises(kubeclient.ApiError) as err:
        client_for(api, tmp_path, token="wrong").request("GET", "/api/v1/namespaces")
    assert err.value.status == 401
    path = write(tmp_path / "no-ca", config(server=api.url, user={"token": api.admin_token}))
    untrusted = kubeclient.Client(kubeclient.KubeConfig(path))  # the system's CAs do not know the fake's
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.request("GET", "/api/v1/namespaces")
    path = write(tmp_path / "insecure", config(server=api.url, user={"token": api.admin_token},
                                               cluster={"insecure-skip-tls-verify": True}))
    assert kubeclient.Client(kubeclient.KubeConfig(path)).request("GET", "/api/v1/namespaces/shop")


def test_an_exec_credential_plugin_gives_the_token(api, tmp_path):
    plugin = tmp_path / "get-token"
    plugin.write_text(f"#!{sys.executable}\nimport json, os\n"
                      "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
                      "assert info['spec']['interactive'] is False\n"
                      "print(json.dumps({'apiVersion': info['apiVersion'], 'kind': 'ExecCredential', "
                      "'status': {'token': os.environ['THE_TOKEN']}}))\n")
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    client = client_for(api, tmp_path, exec={"apiVersion": "client.authentication.k8s.io/v1", "command": "./get-token",
                                             "env": [{"name": "THE_TOKEN", "value": api.admin_token}]})
    assert client.request("GET", "/api/v1/namespaces/shop")["metadata"]["name"] == "shop"
    failing = tmp_path / "kc-fail"
    write(failing, config(user={"exec": {"command": "false"}}))
    with pytest.raises(kubeclient.ConfigError, match="the credential plugin false exited with 1"):
        kubeclient.Client(kubeclient.KubeConfig(str(failing)))


def test_query_strings_are_encoded_as_urlencode_does():
    import urllib.parse

    query = {"labelSelector": "app in (a,b),!x", "fieldSelector": "metadata.name=web-1.app", "watch": "true"}
    assert kubeclient._urlencode(query) == urllib.parse.urlencode(query)
