"""OCI image-layout tarballs built from busybox-static, for a node with no registry.

One uncompressed layer holds /bin/busybox and applet symlinks; two manifests share it: a
busybox image (no entrypoint, PATH=/bin) and a pause image whose entrypoint sleeps until
SIGTERM. Everything is deterministic (fixed mtimes, owners, order), so digests are stable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import tarfile

BUSYBOX_IMAGE = "localhost/kubectl-chaos/busybox:test"
PAUSE_IMAGE = "localhost/kubectl-chaos/pause:test"
BUSYBOX_BINARY = "/bin/busybox"

APPLETS = (
    "sh", "ash", "sleep", "cat", "dd", "yes", "echo", "true", "false", "ls", "ps", "kill", "head",
    "tail", "wc", "grep", "sed", "awk", "env", "id", "hostname", "ip", "ifconfig", "ping", "nc",
    "wget", "mkdir", "rm", "cp", "mv", "ln", "touch", "date", "printf", "test", "seq", "sync",
    "mount", "umount", "nproc", "top", "free", "stat", "timeout", "tr", "cut", "sort", "uniq",
    "tee", "md5sum", "sha256sum", "xargs", "find", "httpd", "pidof", "chmod", "uname", "base64",
)  # fmt: skip
PAUSE_SCRIPT = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done"

_EPOCH = 0
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _tar_add(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, mode: int = 0o755,
             kind: bytes = tarfile.REGTYPE, link: str = "") -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.mtime = _EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = mode
    info.type = kind
    info.linkname = link
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def rootfs_layer(busybox: bytes) -> bytes:
    """An uncompressed tar: /bin/busybox, applet symlinks, the directories a container expects."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "var", "run"):
            _tar_add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        _tar_add(tar, "bin/busybox", data=busybox, mode=0o755)
        for applet in sorted(set(APPLETS)):
            _tar_add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        _tar_add(tar, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
                 mode=0o644)  # fmt: skip
        _tar_add(tar, "etc/group", data=b"root:x:0:\nnogroup:x:65534:\n", mode=0o644)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Blob:
    digest: str
    data: bytes

    @property
    def descriptor_size(self) -> int:
        return len(self.data)


def _image_config(layer_diff_id: str, entrypoint: list[str] | None, cmd: list[str] | None) -> bytes:
    config: dict[str, object] = {"Env": ["PATH=/bin"], "WorkingDir": "/"}
    if entrypoint:
        config["Entrypoint"] = entrypoint
    if cmd:
        config["Cmd"] = cmd
    return _canonical({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_diff_id]},
        "history": [{"created_by": "kubectl-chaos tests/support/images.py", "created": "1970-01-01T00:00:00Z"}],
    })  # fmt: skip


def build_layout_tar(busybox: bytes, out: pathlib.Path) -> dict[str, str]:
    """Write an OCI image-layout tarball with the busybox and pause images to ``out``.

    Returns {image name: manifest digest}.
    """
    layer = rootfs_layer(busybox)
    layer_digest = _sha256(layer)  # uncompressed: the diff_id is the same digest
    blobs: dict[str, bytes] = {layer_digest: layer}
    manifests = []
    images = {
        BUSYBOX_IMAGE: (None, ["sh"]),
        PAUSE_IMAGE: (["/bin/sh", "-c", PAUSE_SCRIPT], None),
    }
    digests = {}
    for name, (entrypoint, cmd) in images.items():
        config = _image_config(layer_digest, entrypoint, cmd)
        config_digest = _sha256(config)
        blobs[config_digest] = config
        manifest = _canonical({
            "schemaVersion": 2,
            "mediaType": _OCI_MANIFEST,
            "config": {"mediaType": _OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": _OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
        })  # fmt: skip
        manifest_digest = _sha256(manifest)
        blobs[manifest_digest] = manifest
        digests[name] = manifest_digest
        manifests.append({
            "mediaType": _OCI_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            # ctr names the image after io.containerd.image.name when present.
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
            },
        })  # fmt: skip
    index = _canonical({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": manifests})  # fmt: skip
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _tar_add(tar, "oci-layout", data=_canonical({"imageLayoutVersion": "1.0.0"}), mode=0o644)
        _tar_add(tar, "index.json", data=index, mode=0o644)
        _tar_add(tar, "blobs", kind=tarfile.DIRTYPE)
        _tar_add(tar, "blobs/sha256", kind=tarfile.DIRTYPE)
        for digest, data in sorted(blobs.items()):
            _tar_add(tar, f"blobs/sha256/{digest.split(':', 1)[1]}", data=data, mode=0o644)
    return digests


def build_default(out_dir: pathlib.Path) -> pathlib.Path:
    """Build the tarball from the host's busybox-static into ``out_dir``; returns its path."""
    busybox = pathlib.Path(BUSYBOX_BINARY).read_bytes()
    out = pathlib.Path(out_dir) / "kubectl-chaos-images.oci.tar"
    build_layout_tar(busybox, out)
    return out
