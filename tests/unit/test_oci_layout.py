"""scripts/oci_layout.py: the same directory always gives the same image digests."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

from scripts import oci_layout

CONFIG = oci_layout.ImageConfig(entrypoint=("/usr/local/bin/chaos-agent",), env=("PATH=/usr/bin:/bin",))
EPOCH_S = 1_704_067_200


def make_rootfs(root):
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "usr" / "bin" / "tool").chmod(0o755)
    os.link(root / "usr" / "bin" / "tool", root / "usr" / "bin" / "tool2")
    (root / "usr" / "bin" / "sh").symlink_to("tool")
    (root / "etc" / "b").write_text("b")
    (root / "etc" / "a").write_text("a")
    (root / "dev").mkdir()
    os.mkfifo(root / "dev" / "fifo")  # not part of an image
    return root


def members(layout_tar, digest):
    with tarfile.open(layout_tar) as outer:
        blob = outer.extractfile("blobs/sha256/" + digest.split(":")[1]).read()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return tar.getmembers()


def test_same_tree_same_digests_whatever_the_mtimes(tmp_path):
    root = make_rootfs(tmp_path / "root")
    first = oci_layout.write_layout(root, tmp_path / "1.tar", "localhost/x:t", CONFIG, epoch_s=EPOCH_S)
    for path in root.rglob("*"):
        if not path.is_symlink() and not path.is_fifo():
            os.utime(path, (1, 1))
    second = oci_layout.write_layout(root, tmp_path / "2.tar", "localhost/x:t", CONFIG, epoch_s=EPOCH_S)
    assert first == second
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    (root / "etc" / "a").write_text("changed")
    third = oci_layout.write_layout(root, tmp_path / "3.tar", "localhost/x:t", CONFIG, epoch_s=EPOCH_S)
    assert third.layer.digest != first.layer.digest


def test_layer_entries_sorted_one_mtime_numeric_owners_hard_links(tmp_path):
    root = make_rootfs(tmp_path / "root")
    layout = oci_layout.write_layout(root, tmp_path / "l.tar", "localhost/x:t", CONFIG, epoch_s=EPOCH_S)
    entries = members(tmp_path / "l.tar", layout.layer.digest)
    names = [m.name for m in entries]
    assert names == ["dev", "etc", "etc/a", "etc/b", "usr", "usr/bin", "usr/bin/sh", "usr/bin/tool", "usr/bin/tool2"]
    assert {m.mtime for m in entries} == {EPOCH_S} and {(m.uname, m.gname) for m in entries} == {("", "")}
    by_name = {m.name: m for m in entries}
    assert by_name["usr/bin/tool2"].islnk() and by_name["usr/bin/tool2"].linkname == "usr/bin/tool"
    assert by_name["usr/bin/sh"].issym() and by_name["usr/bin/tool"].mode == 0o755


def test_index_manifest_and_config_link_up(tmp_path):
    root = make_rootfs(tmp_path / "root")
    layout = oci_layout.write_layout(root, tmp_path / "l.tar", "localhost/kubectl-chaos/agent:abc", CONFIG,
                                     epoch_s=EPOCH_S)
    with tarfile.open(tmp_path / "l.tar") as tar:
        assert json.load(tar.extractfile("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        (entry,) = json.load(tar.extractfile("index.json"))["manifests"]
        manifest = json.load(tar.extractfile("blobs/sha256/" + layout.manifest.digest.split(":")[1]))
        config = json.load(tar.extractfile("blobs/sha256/" + layout.config.digest.split(":")[1]))
    assert entry["digest"] == layout.manifest.digest
    assert entry["annotations"]["io.containerd.image.name"] == "localhost/kubectl-chaos/agent:abc"
    assert manifest["layers"][0] == {"mediaType": oci_layout.MEDIA_LAYER_GZIP, "digest": layout.layer.digest,
                                     "size": layout.layer.size_bytes}
    assert config["rootfs"]["diff_ids"] == [layout.layer_diff_id]
    assert config["created"] == "2024-01-01T00:00:00Z"
    assert oci_layout.read_layout(tmp_path / "l.tar") == ("localhost/kubectl-chaos/agent:abc", CONFIG)
