"""Write a root filesystem directory as a one-layer OCI image-layout tarball, reproducibly.

    python3 scripts/oci_layout.py --rootfs DIR --out agent.oci.tar --name localhost/kubectl-chaos/agent:TAG \
        --entrypoint /usr/local/bin/chaos-agent --env PATH=... [--epoch SOURCE_DATE_EPOCH]

Prints the manifest digest. Standard library only (it runs before any venv exists).

Reproducible by construction: entries in byte order of their paths, every mtime set to the epoch,
owners numeric (no user names looked up on the building host), no atime/ctime, gzip without a
name or time in its header; the config's ``created`` is the epoch too. The same directory gives
the same digests on every run (tests/node/test_agent_container.py checks it).

Layout (https://github.com/opencontainers/image-spec/blob/main/image-layout.md): ``oci-layout``,
``index.json`` (one manifest, named for ``ctr images import`` by ``io.containerd.image.name``),
``blobs/sha256/<digest>`` for the layer (tar+gzip), the config and the manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import stat
import sys
import tarfile
from collections.abc import Iterator, Sequence

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# Level 6 (gzip's default) costs ~3x the time of level 1 for ~10% less; the layer is written on
# every source change, and imported locally, never pulled.
GZIP_LEVEL = 1
# Device nodes and sockets are never part of an image: the runtime mounts /dev itself.
_SKIPPED_KINDS = (stat.S_ISCHR, stat.S_ISBLK, stat.S_ISSOCK, stat.S_ISFIFO)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file system object of the layer, as it will be written (relative path, no leading /)."""

    path: str
    kind: bytes  # tarfile.DIRTYPE, REGTYPE, SYMTYPE, LNKTYPE
    mode: int
    uid: int
    gid: int
    size_bytes: int = 0
    link: str = ""  # symlink target, or for a hard link the path of the first entry with that inode
    source: pathlib.Path | None = None  # regular files: where the content is read from


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    entrypoint: tuple[str, ...]
    env: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    working_dir: str = "/"
    labels: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Blob:
    digest: str  # "sha256:<hex>"
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """What was written: the digests ``ctr`` and the kubelet would name."""

    manifest: Blob
    config: Blob
    layer: Blob
    layer_diff_id: str  # sha256 of the uncompressed tar (the config's rootfs.diff_ids)


# ---------------------------------------------------------------- planning (reads only)


def _walk_sorted(root: pathlib.Path, rel: str = "") -> Iterator[str]:
    """Relative paths under ``root`` in byte order, a directory before its contents; no symlinks followed."""
    names = sorted(os.listdir(root / rel) if rel else os.listdir(root), key=os.fsencode)
    for name in names:
        child = f"{rel}/{name}" if rel else name
        yield child
        st = os.lstat(root / child)
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_sorted(root, child)


def plan_entries(root: pathlib.Path) -> list[Entry]:
    """Every object under ``root`` as a layer entry; the second path of a hard-linked file is a link."""
    root = pathlib.Path(root)
    entries: list[Entry] = []
    first_path_of_inode: dict[tuple[int, int], str] = {}
    for rel in _walk_sorted(root):
        st = os.lstat(root / rel)
        perm = stat.S_IMODE(st.st_mode)
        if any(check(st.st_mode) for check in _SKIPPED_KINDS):
            continue
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(rel, tarfile.DIRTYPE, perm, st.st_uid, st.st_gid))
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Entry(rel, tarfile.SYMTYPE, perm, st.st_uid, st.st_gid, link=os.readlink(root / rel)))
        elif stat.S_ISREG(st.st_mode):
            inode = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and inode in first_path_of_inode:
                entries.append(Entry(rel, tarfile.LNKTYPE, perm, st.st_uid, st.st_gid, link=first_path_of_inode[inode]))
                continue
            first_path_of_inode[inode] = rel
            entries.append(Entry(rel, tarfile.REGTYPE, perm, st.st_uid, st.st_gid, size_bytes=st.st_size,
                                 source=root / rel))  # fmt: skip
    return entries


def image_config_json(config: ImageConfig, layer_diff_id: str, *, epoch_s: int) -> bytes:
    created = _rfc3339(epoch_s)
    body: dict[str, object] = {"Entrypoint": list(config.entrypoint), "Env": list(config.env),
                               "WorkingDir": config.working_dir}  # fmt: skip
    if config.cmd:
        body["Cmd"] = list(config.cmd)
    if config.labels:
        body["Labels"] = dict(config.labels)
    return _canonical({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": body,
        "rootfs": {"type": "layers", "diff_ids": [layer_diff_id]},
        "history": [{"created": created, "created_by": "kubectl-chaos scripts/build-agent-image.sh"}],
    })  # fmt: skip


def manifest_json(config: Blob, layer: Blob) -> bytes:
    return _canonical({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config.digest, "size": config.size_bytes},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": layer.digest, "size": layer.size_bytes}],
    })  # fmt: skip


def index_json(manifest: Blob, name: str) -> bytes:
    return _canonical({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest.digest,
            "size": manifest.size_bytes,
            "platform": {"architecture": "amd64", "os": "linux"},
            # ctr names the image after io.containerd.image.name; the OCI ref name is the tag alone.
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        }],
    })  # fmt: skip


# ---------------------------------------------------------------- writing


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: io.RawIOBase | io.BufferedIOBase | None):
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size_bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self.sha.update(data)
        self.size_bytes += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)


def write_layer(entries: Sequence[Entry], out: io.BufferedIOBase | None, *, epoch_s: int) -> tuple[Blob, str]:
    """Write the entries as tar+gzip to ``out`` (None: only compute); returns (the blob, the diff_id)."""
    compressed = _HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0) as gz:
        plain = _HashingWriter(gz)
        with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for entry in entries:
                info = tarfile.TarInfo(entry.path)
                info.type = entry.kind
                info.mode = entry.mode
                info.uid, info.gid = entry.uid, entry.gid
                info.uname = info.gname = ""
                info.mtime = epoch_s
                info.linkname = entry.link
                if entry.kind == tarfile.REGTYPE and entry.source is not None:
                    info.size = entry.size_bytes
                    with open(entry.source, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return Blob("sha256:" + compressed.sha.hexdigest(), compressed.size_bytes), "sha256:" + plain.sha.hexdigest()


def write_layout(rootfs: pathlib.Path, out: pathlib.Path, name: str, config: ImageConfig, *, epoch_s: int) -> Layout:
    """The OCI image-layout tarball of ``rootfs`` at ``out`` (written to a temp name, then renamed)."""
    entries = plan_entries(rootfs)
    out = pathlib.Path(out)
    layer_tmp = out.with_name(out.name + ".layer.tmp")
    try:
        with open(layer_tmp, "wb") as f:
            layer, diff_id = write_layer(entries, f, epoch_s=epoch_s)
        config_bytes = image_config_json(config, diff_id, epoch_s=epoch_s)
        config_blob = Blob(_digest(config_bytes), len(config_bytes))
        manifest_bytes = manifest_json(config_blob, layer)
        manifest_blob = Blob(_digest(manifest_bytes), len(manifest_bytes))
        tmp = out.with_name(out.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", _canonical({"imageLayoutVersion": "1.0.0"}), epoch_s)
            _add_bytes(tar, "index.json", index_json(manifest_blob, name), epoch_s)
            for d in ("blobs", "blobs/sha256"):
                info = tarfile.TarInfo(d)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch_s
                tar.addfile(info)
            blobs = {layer.digest: None, config_blob.digest: config_bytes, manifest_blob.digest: manifest_bytes}
            for digest in sorted(blobs):
                path = "blobs/sha256/" + digest.split(":", 1)[1]
                data = blobs[digest]
                if data is None:
                    info = tarfile.TarInfo(path)
                    info.size, info.mode, info.mtime = layer.size_bytes, 0o644, epoch_s
                    with open(layer_tmp, "rb") as f:
                        tar.addfile(info, f)
                else:
                    _add_bytes(tar, path, data, epoch_s)
        os.replace(tmp, out)
    finally:
        layer_tmp.unlink(missing_ok=True)
    return Layout(manifest=manifest_blob, config=config_blob, layer=layer, layer_diff_id=diff_id)


def read_layout(path: pathlib.Path) -> tuple[str, ImageConfig]:
    """The image name and config of a layout tarball this module wrote (its only manifest)."""
    with tarfile.open(path) as tar:

        def member(name: str) -> dict:
            f = tar.extractfile(name)
            assert f is not None, name
            return json.load(f)

        (entry,) = member("index.json")["manifests"]
        manifest = member("blobs/sha256/" + entry["digest"].split(":", 1)[1])
        config = member("blobs/sha256/" + manifest["config"]["digest"].split(":", 1)[1])["config"]
    return entry["annotations"]["io.containerd.image.name"], ImageConfig(
        entrypoint=tuple(config.get("Entrypoint") or ()), env=tuple(config.get("Env") or ()),
        cmd=tuple(config.get("Cmd") or ()), working_dir=config.get("WorkingDir", "/"),
        labels=tuple(sorted((config.get("Labels") or {}).items())))


def _add_bytes(tar: tarfile.TarFile, path: str, data: bytes, epoch_s: int) -> None:
    info = tarfile.TarInfo(path)
    info.size, info.mode, info.mtime = len(data), 0o644, epoch_s
    tar.addfile(info, io.BytesIO(data))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _rfc3339(epoch_s: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rootfs", required=True, type=pathlib.Path)
    p.add_argument("--out", required=True, type=pathlib.Path)
    p.add_argument("--name", required=True, help="image name for ctr, e.g. localhost/kubectl-chaos/agent:TAG")
    p.add_argument("--entrypoint", action="append", default=[], help="one argv word per flag")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE, one per flag")
    p.add_argument("--epoch", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")),
                   help="every mtime and the created time (default: $SOURCE_DATE_EPOCH or 0)")
    p.add_argument("--json", action="store_true", help="print every digest as JSON, not just the manifest's")
    args = p.parse_args(argv)
    layout = write_layout(args.rootfs, args.out, args.name,
                          ImageConfig(entrypoint=tuple(args.entrypoint), env=tuple(args.env)), epoch_s=args.epoch)
    if args.json:
        print(json.dumps(dataclasses.asdict(layout), sort_keys=True))
    else:
        print(layout.manifest.digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
