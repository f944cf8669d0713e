"""A small Kubernetes API client for the plugin's few calls: kubeconfig, TLS, JSON over HTTPS.

Why not the ``kubernetes`` package: importing it and loading a kubeconfig with it takes about
0.2-0.3 s on the development machine, about twice everything else ``kubectl chaos --set-cpu``
does (Python start, the command line, five API round trips and the agent's work), and it was
the whole difference to ``kubectl patch``. This module uses the standard library only (``socket``,
``ssl``, ``json``; a kubeconfig in kubectl's block style is read by ``kubeyaml``, anything else with
PyYAML) and speaks HTTP/1.1 itself: a few ms of imports.

It reads kubeconfig files as kubectl does (``--kubeconfig``, else ``$KUBECONFIG`` with its files
merged, first one wins, else ``~/.kube/config``; relative paths are relative to the file that
names them) and supports what kubeconfigs of real clusters use: the server's CA (file or data)
or ``insecure-skip-tls-verify``, ``tls-server-name``, bearer tokens (``token``, ``tokenFile``),
client certificates (files or data), basic auth, and ``exec`` credential plugins
(``client.authentication.k8s.io`` ExecCredential: a token or a client certificate). A kubeconfig
that needs anything else (an ``auth-provider``, a ``proxy-url``) raises :class:`Unsupported`, and
the caller uses the ``kubernetes`` package instead.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Iterable, Iterator
from typing import Any


class ConfigError(Exception):
    """The kubeconfig cannot be used (missing, unreadable, no such context); the message says which."""


class Unsupported(ConfigError):
    """The kubeconfig uses a feature this client does not implement (the caller falls back)."""


class ApiError(Exception):
    """An error answer of the API server: its status code and the Status message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


# -----------------------------------------------------------------------------------------------
# kubeconfig


def kubeconfig_paths(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    env = os.environ.get("KUBECONFIG")
    if env:
        return [p for p in env.split(os.pathsep) if p]
    return [os.path.join(os.path.expanduser("~"), ".kube", "config")]


def load_kubeconfig(explicit: str | None) -> dict:
    """The merged kubeconfig (named entries: the first file that has a name wins), with every file
    path made absolute relative to the file it came from."""
    merged: dict[str, Any] = {"clusters": {}, "users": {}, "contexts": {}, "current-context": None}
    found = False
    for path in kubeconfig_paths(explicit):
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            if explicit:
                raise ConfigError(f"{path} does not exist") from None
            continue
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        data = _parse_kubeconfig(path, text)
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a kubeconfig")
        found = True
        base = os.path.dirname(os.path.abspath(path))
        for kind, inner in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for item in data.get(kind) or []:
                name = item.get("name")
                if name is not None and name not in merged[kind]:
                    merged[kind][name] = _absolute(dict(item.get(inner) or {}), base)
        if merged["current-context"] is None and data.get("current-context"):
            merged["current-context"] = data["current-context"]
    if not found:
        raise ConfigError(f"no kubeconfig found (looked at {', '.join(kubeconfig_paths(explicit))})")
    return merged


def _parse_kubeconfig(path: str, text: str) -> Any:
    """The file's YAML: kubectl's block style without PyYAML (see kubeyaml), anything else with it."""
    from plugin.backends import kubeyaml

    try:
        return kubeyaml.load(text) or {}
    except kubeyaml.Unsupported:
        pass
    import yaml

    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


_PATH_KEYS = ("certificate-authority", "client-certificate", "client-key", "tokenFile")


def _absolute(entry: dict, base: str) -> dict:
    for key in _PATH_KEYS:
        if entry.get(key) and not os.path.isabs(entry[key]):
            entry[key] = os.path.join(base, entry[key])
    if isinstance(entry.get("exec"), dict):
        command = entry["exec"].get("command") or ""
        if os.sep in command and not os.path.isabs(command):  # as client-go: relative to the kubeconfig
            entry["exec"] = dict(entry["exec"], command=os.path.join(base, command))
    return entry


class KubeConfig:
    """One context of a kubeconfig: where the API server is and how to authenticate."""

    def __init__(self, explicit: str | None = None, context: str | None = None):
        merged = load_kubeconfig(explicit)
        name = context or merged["current-context"]
        if not name:
            raise ConfigError("no context given and the kubeconfig has no current-context")
        if name not in merged["contexts"]:
            raise ConfigError(f"context {name!r} not found; contexts: {', '.join(sorted(merged['contexts'])) or '-'}")
        ctx = merged["contexts"][name]
        self.context = name
        self.namespace = ctx.get("namespace") or "default"
        cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
        if cluster_name not in merged["clusters"]:
            raise ConfigError(f"context {name!r} names cluster {cluster_name!r}, which the kubeconfig does not have")
        self.cluster = merged["clusters"][cluster_name]
        self.user = merged["users"].get(user_name, {}) if user_name else {}
        if not self.cluster.get("server"):
            raise ConfigError(f"cluster {cluster_name!r} has no server")
        for unsupported in ("proxy-url", "disable-compression"):
            if self.cluster.get(unsupported):
                raise Unsupported(f"cluster setting {unsupported}")
        if self.user.get("auth-provider"):
            raise Unsupported("user setting auth-provider")
        self.server = self.cluster["server"].rstrip("/")


# -----------------------------------------------------------------------------------------------
# HTTP/1.1 over one socket: the plugin's few requests need no more. (http.client alone takes ~12 ms
# to import, most of it the email package it parses headers with.)


class _Connection:
    """One HTTP/1.1 connection (TCP, TLS over it for https), kept alive between requests."""

    def __init__(self, host: str, port: int, timeout_s: float, context: ssl.SSLContext | None, server_name: str):
        sock = socket.create_connection((host, port), timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=server_name)
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.open = True

    def send(self, head: bytes, body: bytes | None) -> None:
        self.sock.sendall(head + (body or b""))

    def response(self) -> tuple[int, dict[str, str]]:
        """The status code and headers (names lowercased) of the next response."""
        line = self.reader.readline(65537)
        if not line:
            raise RemoteDisconnected("the API server closed the connection without an answer")
        parts = line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.1 answer: {line[:80]!r}")
        headers: dict[str, str] = {}
        while True:
            line = self.reader.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def chunks(self, headers: dict[str, str]):
        """The body's pieces as they arrive (chunked, Content-Length, or up to the connection's end)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = self.reader.readline(1024)
                if not size_line:
                    raise RemoteDisconnected("the API server closed the connection in the middle of an answer")
                try:
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                except ValueError:
                    raise ProtocolError(f"a chunk size that is not one: {size_line[:40]!r}") from None
                if size == 0:
                    while self.reader.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                data = self.reader.read(size)
                self.reader.readline(3)  # the CRLF after the chunk
                yield data
        elif "content-length" in headers:
            left = int(headers["content-length"])
            if left:
                yield self.reader.read(left)
        else:
            self.open = False
            while data := self.reader.read1(65536):
                yield data

    def close(self) -> None:
        self.open = False
        for closable in (self.reader, self.sock):
            try:
                closable.close()
            except OSError:
                pass


class RemoteDisconnected(ConnectionError):
    """The server closed the connection before or while answering."""


class ProtocolError(OSError):
    """The server's answer is not HTTP/1.1 as expected."""


class Stream:
    """A watch response: ``lines()`` yields its JSON lines as they come; ``close()`` drops the connection."""

    def __init__(self, conn: _Connection, headers: dict[str, str]):
        self.conn = conn
        self.headers = headers

    def lines(self) -> Iterator[str]:
        return split_lines(self.conn.chunks(self.headers))

    def close(self) -> None:
        self.conn.close()


class Client:
    """JSON requests to the API server of a :class:`KubeConfig`, over one kept-alive connection."""

    def __init__(self, config: KubeConfig, *, connect_timeout_s: float = 10.0, user_agent: str = "kubectl-chaos"):
        self.config = config
        self.host = config.server
        scheme, _, rest = config.server.partition("://")
        if scheme not in ("https", "http") or not rest:
            raise ConfigError(f"server {config.server!r} is not an http(s) URL")
        netloc, slash, path = rest.partition("/")
        self._https = scheme == "https"
        self._netloc, self._port = _host_port(netloc, 443 if self._https else 80)
        self._prefix = (slash + path).rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self._headers = {"Host": netloc, "User-Agent": user_agent, "Accept": "application/json"}
        self._context: ssl.SSLContext | None = None
        self._conn: _Connection | None = None
        self._auth()

    # -- authentication --

    def _auth(self) -> None:
        user = self.config.user
        cert = key = None
        token = user.get("token")
        if not token and user.get("tokenFile"):
            try:
                with open(user["tokenFile"]) as f:
                    token = f.read().strip()
            except OSError as e:
                raise ConfigError(f"cannot read tokenFile {user['tokenFile']}: {e}") from None
        if user.get("client-certificate-data") or user.get("client-certificate"):
            cert = _pem(user, "client-certificate")
            key = _pem(user, "client-key")
        if user.get("exec"):
            credential = _exec_credential(user["exec"], self.config.cluster)
            token = credential.get("token") or token
            if credential.get("clientCertificateData"):
                cert = credential["clientCertificateData"].encode()
                key = (credential.get("clientKeyData") or "").encode()
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        elif user.get("username") is not None and user.get("password") is not None:
            import base64

            basic = base64.b64encode(f"{user['username']}:{user['password']}".encode()).decode()
            self._headers["Authorization"] = f"Basic {basic}"
        if self._https:
            self._context = self._tls(cert, key)

    def _tls(self, cert: bytes | None, key: bytes | None) -> ssl.SSLContext:
        cluster = self.config.cluster
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
        if cluster.get("insecure-skip-tls-verify"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            # As client-go: the kubeconfig's CA alone when it names one (loading the system's store
            # as well would also cost ~17 ms), else the system's.
            ca = _pem(cluster, "certificate-authority")
            if ca:
                context.load_verify_locations(cadata=ca.decode())
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if cert and key:
            import tempfile

            # ssl loads a client certificate from files only: a private temporary file, gone at once.
            with tempfile.NamedTemporaryFile(prefix="kcx-", suffix=".pem") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(cert.rstrip(b"\n") + b"\n" + key)
                f.flush()
                context.load_cert_chain(f.name)
        return context

    # -- requests --

    def _connect(self, timeout_s: float) -> _Connection:
        name = self.config.cluster.get("tls-server-name") or self._netloc
        return _Connection(self._netloc, self._port, timeout_s, self._context if self._https else None, name)

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
                content_type: str = "application/json", stream: bool = False,
                timeout_s: float | None = None) -> Any:
        """One request; the decoded JSON answer, or a :class:`Stream` for ``stream=True`` (a watch, which
        takes the kept-alive connection with it). An error answer raises :class:`ApiError` with the
        Status message; a network failure raises OSError (ssl.SSLError is one)."""
        target = self._prefix + path + (("?" + _urlencode(query)) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        head = [f"{method} {target} HTTP/1.1"]
        head += [f"{k}: {v}" for k, v in self._headers.items()]
        if data is not None:
            head.append(f"Content-Type: {content_type}")
        if data is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(data or b'')}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode()
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._connect(self.connect_timeout_s)
            conn = self._conn
            conn.sock.settimeout(timeout_s or 60.0)
            try:
                conn.send(request, data)
                status, headers = conn.response()
            except (RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self._conn = None
                if reused and attempt == 0:
                    continue  # the server closed the idle kept-alive connection: once more on a new one
                raise
            except BaseException:
                # Anything else mid-exchange (a timeout, Ctrl-C): the answer's rest may still come on
                # this connection, and the next request would read it as its own. Never reuse it.
                conn.close()
                self._conn = None
                raise
            if stream and 200 <= status <= 299:
                self._conn = None  # the watch owns it now
                return Stream(conn, headers)
            try:
                payload = b"".join(conn.chunks(headers))
            except BaseException:
                conn.close()
                self._conn = None
                raise
            if not conn.open or headers.get("connection", "").lower() == "close":
                conn.close()
                self._conn = None
            if not 200 <= status <= 299:
                raise ApiError(status, status_message(payload))
            return json.loads(payload)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def split_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The lines of a watch stream (one JSON event each) out of its chunks, cut anywhere."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode()
    if pending.strip():
        yield pending.decode()


def _host_port(netloc: str, default: int) -> tuple[str, int]:
    if netloc.startswith("["):  # [IPv6]:port
        host, _, rest = netloc[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, sep, port = netloc.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return netloc, default


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _urlencode(query: dict[str, str]) -> str:
    """``application/x-www-form-urlencoded`` as urllib.parse.urlencode makes it (without its import)."""

    def quote(text: str) -> str:
        return "".join(chr(b) if b in _UNRESERVED else "+" if b == 0x20 else f"%{b:02X}"
                       for b in str(text).encode())

    return "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())


def _pem(entry: dict, key: str) -> bytes | None:
    """``key-data`` (base64) or the file ``key`` names, as PEM bytes."""
    data = entry.get(f"{key}-data")
    if data:
        import base64

        try:
            return base64.b64decode(data)
        except ValueError as e:
            raise ConfigError(f"{key}-data is not base64: {e}") from None
    path = entry.get(key)
    if path:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(f"cannot read {key} {path}: {e}") from None
    return None


def _exec_credential(spec: dict, cluster: dict) -> dict:
    """Run an exec credential plugin (client.authentication.k8s.io) and return its ``status``."""
    api_version = spec.get("apiVersion") or "client.authentication.k8s.io/v1"
    command = spec.get("command")
    if not command:
        raise ConfigError("the user's exec has no command")
    env = dict(os.environ)
    for item in spec.get("env") or []:
        env[item["name"]] = item.get("value", "")
    info: dict[str, Any] = {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
    if spec.get("provideClusterInfo"):
        info["spec"]["cluster"] = {k: v for k, v in (
            ("server", cluster.get("server")), ("certificate-authority-data", cluster.get("certificate-authority-data")),
            ("insecure-skip-tls-verify", cluster.get("insecure-skip-tls-verify"))) if v}
    env["KUBERNETES_EXEC_INFO"] = json.dumps(info)
    import subprocess

    try:
        out = subprocess.run([command, *(spec.get("args") or [])], env=env, capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"the credential plugin {command} failed: {e}") from None
    if out.returncode != 0:
        raise ConfigError(f"the credential plugin {command} exited with {out.returncode}: "
                          f"{out.stderr.strip()[-300:]}")
    try:
        return json.loads(out.stdout).get("status") or {}
    except ValueError:
        raise ConfigError(f"the credential plugin {command} printed no ExecCredential") from None


def status_message(data: bytes) -> str:
    text = data.decode(errors="replace")
    try:
        return json.loads(text).get("message", text)
    except ValueError:
        return text
