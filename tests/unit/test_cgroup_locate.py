"""cgroupctl.detect_mode and locate on fixture trees of documented layouts (see fixtures/cgroup/build.py)."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

from cgroupctl import Mode, NotFound, detect_mode, locate, read_limits, read_usage

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "cgroup"
MiB = 1 << 20
UID = "5f0e1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
UID_ = UID.replace("-", "_")
CID = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
NODE = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0"
SYSTEMD_POD = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
KIND_POD = ("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
            f"kubelet-kubepods-burstable-pod{UID_}.slice")

# scenario -> (mode, container cgroup path inside the hierarchy, runtime cgroups path, cgroup root)
SCENARIOS = {
    "v1-cgroupfs-containerd": (Mode.V1, f"/kubepods/burstable/pod{UID}/{CID}",
                               f"/kubepods/burstable/pod{UID}/{CID}", "sys/fs/cgroup"),
    "v1-cgroupfs-crio": (Mode.V1, f"/kubepods/burstable/pod{UID}/crio-{CID}",
                         f"/kubepods/burstable/pod{UID}/crio-{CID}", "sys/fs/cgroup"),
    "hybrid-systemd-containerd": (Mode.HYBRID, f"{SYSTEMD_POD}/cri-containerd-{CID}.scope",
                                  f"kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}", "sys/fs/cgroup"),
    "v2-systemd-containerd": (Mode.V2, f"{SYSTEMD_POD}/cri-containerd-{CID}.scope",
                              f"kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}", "sys/fs/cgroup"),
    # crun runs the processes in <scope>/container; the limits are on the scope.
    "v2-systemd-crio": (Mode.V2, f"{SYSTEMD_POD}/crio-{CID}.scope",
                        f"kubepods-burstable-pod{UID_}.slice:crio:{CID}", "sys/fs/cgroup"),
    "v2-cgroupfs-containerd": (Mode.V2, f"/kubepods/burstable/pod{UID}/{CID}",
                               f"/kubepods/burstable/pod{UID}/{CID}", "sys/fs/cgroup"),
    # kind: the node's containerd reports paths relative to the node's own cgroup.
    "kind-v1-host": (Mode.V1, f"/docker/{NODE}/kubelet/kubepods/burstable/pod{UID}/{CID}",
                     f"/kubelet/kubepods/burstable/pod{UID}/{CID}", "sys/fs/cgroup"),
    "kind-v1-node": (Mode.V1, f"/kubelet/kubepods/burstable/pod{UID}/{CID}",
                     f"/kubelet/kubepods/burstable/pod{UID}/{CID}", "sys/fs/cgroup"),
    "kind-v2-host": (Mode.V2, f"/system.slice/docker-{NODE}.scope{KIND_POD}/cri-containerd-{CID}.scope",
                     f"kubelet-kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}", "sys/fs/cgroup"),
    # The reader is in its own cgroup namespace; the host tree is bind-mounted at /host/sys/fs/cgroup.
    "cgroupns-v2": (Mode.V2, f"/kubepods/burstable/pod{UID}/{CID}",
                    f"/kubepods/burstable/pod{UID}/{CID}", "host/sys/fs/cgroup"),
}


def _roots(name: str) -> tuple[str, str]:
    return str(FIXTURES / name / "proc"), str(FIXTURES / name / SCENARIOS[name][3])


def _hierarchy(mode: Mode, root: str, controller: str) -> str:
    return root if mode is Mode.V2 else os.path.join(root, controller)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_detect_mode(name):
    assert detect_mode(_roots(name)[1]) is SCENARIOS[name][0]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("by", ["pid", "cgroups_path"])
def test_locate_finds_container_and_pod_directories(name, by):
    mode, path, cgroups_path, _ = SCENARIOS[name]
    proc_root, cgroup_root = _roots(name)
    kwargs = {"pid": 4242} if by == "pid" else {"cgroups_path": cgroups_path}
    cg = locate(proc_root=proc_root, cgroup_root=cgroup_root, **kwargs)
    assert cg.mode is mode
    assert cg.container_id == CID and cg.pod_uid == UID
    for controller in ("cpu", "cpuacct", "memory"):
        hier = _hierarchy(mode, cgroup_root, controller)
        real = os.path.realpath
        assert real(getattr(cg.container, controller)) == real(hier) + path
        assert real(getattr(cg.pod, controller)) == real(hier) + os.path.dirname(path)
        assert cg.cgroup_paths[controller] == path
    # The directories hold the fixture's limits and usage.
    limits = read_limits(cg)
    assert (limits.cpu_quota_us, limits.cpu_period_us, limits.memory_limit_bytes) == (50000, 100000, 128 << 20)
    assert read_limits(cg, pod=True).memory_limit_bytes == 128 << 20
    usage = read_usage(cg)
    assert usage.memory_usage_bytes == 36 << 20 and usage.memory_unreclaimable_bytes == 30 << 20
    assert usage.nr_throttled == 7 and usage.throttled_ns == 34_000_000
    assert usage.cpu_usage_ns in (123456789, 123456000)


def test_v1_symlinked_controllers_resolve_to_the_shared_hierarchy():
    proc_root, cgroup_root = _roots("v1-cgroupfs-containerd")
    cg = locate(pid=4242, proc_root=proc_root, cgroup_root=cgroup_root)
    assert os.path.realpath(cg.container.cpu) == os.path.realpath(cg.container.cpuacct)
    assert "cpu,cpuacct" in os.path.realpath(cg.container.cpu)


def test_cgroup_namespace_path_is_refused_against_the_readers_own_mount():
    # /proc/4242/cgroup shows /../../../burstable/...: outside the reader's own /sys/fs/cgroup.
    with pytest.raises(NotFound, match="outside the cgroup mount"):
        locate(pid=4242, proc_root=str(FIXTURES / "cgroupns-v2" / "proc"),
               cgroup_root=str(FIXTURES / "cgroupns-v2" / "sys" / "fs" / "cgroup"))


def test_a_missing_process_is_not_found_with_the_path(tmp_path):
    with pytest.raises(NotFound, match="process 999999.*does not exist"):
        locate(pid=999999, proc_root=str(tmp_path), cgroup_root=_roots("v2-cgroupfs-containerd")[1])


def test_no_cgroup_tree_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no cgroup hierarchy"):
        detect_mode(str(tmp_path))


@pytest.mark.parametrize("cgroups_path", ["/../../etc", "/kubepods/nope/pod1/c", "kubepods-x.slice:crio:nope"])
def test_cgroups_paths_that_do_not_exist_or_escape_are_not_found(cgroups_path):
    with pytest.raises(NotFound):
        locate(cgroups_path=cgroups_path, cgroup_root=_roots("v2-cgroupfs-containerd")[1])


def test_a_symlink_out_of_the_mount_is_refused(tmp_path):
    tree = tmp_path / "cg"
    shutil.copytree(FIXTURES / "v2-cgroupfs-containerd" / "sys" / "fs" / "cgroup", tree, symlinks=True)
    outside = tmp_path / "outside" / "ctr"
    outside.mkdir(parents=True)
    (outside / "cpu.max").write_text("max 100000\n")
    (tree / "kubepods" / "evil").symlink_to(outside.parent)
    with pytest.raises(NotFound, match="outside the cgroup mount"):
        locate(cgroups_path="/kubepods/evil/ctr", cgroup_root=str(tree))


def test_a_nested_cgroups_path_found_twice_is_ambiguous(tmp_path):
    tree = tmp_path / "cg"
    src = FIXTURES / "kind-v1-host" / "sys" / "fs" / "cgroup"
    shutil.copytree(src, tree, symlinks=True)
    # A second kind node holding the same relative path.
    for hier in ("cpu,cpuacct", "memory"):
        shutil.copytree(tree / hier / "docker" / NODE, tree / hier / "docker" / ("1" * 64))
    with pytest.raises(NotFound, match="ambiguous"):
        locate(cgroups_path=f"/kubelet/kubepods/burstable/pod{UID}/{CID}", cgroup_root=str(tree))


def test_to_dict_round_trip():
    from cgroupctl import ContainerCgroups

    proc_root, cgroup_root = _roots("hybrid-systemd-containerd")
    cg = locate(pid=4242, proc_root=proc_root, cgroup_root=cgroup_root)
    assert ContainerCgroups.from_dict(cg.to_dict()) == cg


def test_committed_fixture_trees_are_what_build_py_makes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cgroup_fixture_build", FIXTURES / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.main(str(tmp_path))

    def tree(root: pathlib.Path) -> dict[str, str]:
        out = {}
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(root))
            if rel.startswith("build.py") or "__pycache__" in rel:
                continue
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = path.read_text()
        return out

    assert tree(tmp_path) == tree(FIXTURES)


def _hybrid(name: str, tmp_path: pathlib.Path):
    shutil.copytree(FIXTURES / name, tmp_path / name, symlinks=True)
    root = tmp_path / name / "sys" / "fs" / "cgroup"
    return root, [locate(proc_root=str(tmp_path / name / "proc"), cgroup_root=str(root), **kwargs)
                  for kwargs in ({"pid": 4242}, {"cgroups_path": f"kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}"
                                                 if "systemd" in name else f"/kubepods/burstable/pod{UID}/{CID}"})]


def _short(root: pathlib.Path, paths) -> list[str]:
    return [str(pathlib.Path(os.path.realpath(p)).relative_to(os.path.realpath(root))).split("/", 1)[0]
            + "/" + pathlib.Path(p).name for p in paths]


def test_hybrid_with_memory_bound_to_the_unified_tree_uses_its_v2_files(tmp_path):
    from cgroupctl import Limits, plan, read_state, set_limits, snapshot

    root, found = _hybrid("hybrid-v2memory-systemd-containerd", tmp_path)
    for cg in found:
        assert detect_mode(str(root)) is Mode.HYBRID and cg.mode is Mode.HYBRID
        assert cg.v2_controllers == ("memory",)
        assert os.path.realpath(cg.container.memory) == str(root / "unified") + SYSTEMD_POD + f"/cri-containerd-{CID}.scope"
        assert os.path.realpath(cg.container.cpu) == str(root / "cpu,cpuacct") + SYSTEMD_POD + f"/cri-containerd-{CID}.scope"
    cg = found[0]
    high = int(0.9 * 128 * MiB) // 4096 * 4096
    limits = read_limits(cg)
    assert (limits.cpu_quota_us, limits.cpu_shares, limits.memory_limit_bytes, limits.memory_high_bytes,
            limits.memory_swap_limit_bytes) == (50000, 512, 128 * MiB, high, 128 * MiB)
    usage = read_usage(cg)
    assert (usage.cpu_usage_ns, usage.memory_usage_bytes, usage.memory_unreclaimable_bytes) == (
        123456789, 36 * MiB, 30 * MiB)
    assert sorted(_short(root, snapshot(cg).files)) == sorted(
        ["cpu,cpuacct/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_period_us", "unified/memory.max",
         "unified/memory.high", "unified/memory.swap.max"] * 2)
    p = plan(read_state(cg), Limits(cpu_quota_us=150000, memory_limit_bytes=256 * MiB))
    assert [(s.stage, _short(root, [s.path])[0], s.value) for s in p.steps] == [
        ("pod-before", "cpu,cpuacct/cpu.cfs_quota_us", "150000"),
        ("pod-before", "unified/memory.max", str(256 * MiB)),
        ("container", "cpu,cpuacct/cpu.cfs_quota_us", "150000"),
        ("container", "unified/memory.max", str(256 * MiB)),
        ("container", "unified/memory.high", str(2 * high)),
    ]
    set_limits(cg, Limits(memory_limit_bytes=256 * MiB))
    assert (pathlib.Path(cg.container.memory) / "memory.high").read_text().strip() == str(2 * high)


def test_hybrid_with_cpu_bound_to_the_unified_tree_uses_cpu_max_and_v1_cpuacct(tmp_path):
    from cgroupctl import Limits, plan, read_state, snapshot

    root, found = _hybrid("hybrid-v2cpu-cgroupfs-containerd", tmp_path)
    for cg in found:
        assert cg.v2_controllers == ("cpu",)
        assert os.path.realpath(cg.container.cpu) == str(root / "unified" / "kubepods" / "burstable" / f"pod{UID}" / CID)
        assert os.path.realpath(cg.container.cpuacct) == str(root / "cpuacct" / "kubepods" / "burstable" / f"pod{UID}" / CID)
    cg = found[0]
    limits = read_limits(cg)
    assert (limits.cpu_quota_us, limits.cpu_period_us, limits.cpu_weight, limits.memory_limit_bytes) == (
        50000, 100000, 20, 128 * MiB)
    usage = read_usage(cg)
    # Usage from v2's cpu.stat (the cpu cgroup), throttling from there too.
    assert (usage.cpu_usage_ns, usage.nr_throttled, usage.throttled_ns) == (123456000, 7, 34_000_000)
    assert sorted(_short(root, snapshot(cg).files)) == sorted(
        ["unified/cpu.max", "memory/memory.limit_in_bytes", "memory/memory.memsw.limit_in_bytes"] * 2)
    p = plan(read_state(cg), Limits(cpu_quota_us=150000, memory_limit_bytes=256 * MiB))
    assert [(s.stage, _short(root, [s.path])[0], s.value) for s in p.steps] == [
        ("pod-before", "unified/cpu.max", "150000 100000"),
        ("pod-before", "memory/memory.limit_in_bytes", str(256 * MiB)),
        ("container", "unified/cpu.max", "150000 100000"),
        ("container", "memory/memory.memsw.limit_in_bytes", str(256 * MiB)),
        ("container", "memory/memory.limit_in_bytes", str(256 * MiB)),
    ]


def test_a_hybrid_host_without_controllers_on_the_unified_tree_is_all_v1():
    proc_root, cgroup_root = _roots("hybrid-systemd-containerd")
    cg = locate(pid=4242, proc_root=proc_root, cgroup_root=cgroup_root)
    assert cg.v2_controllers == () and not cg.uses_v2("cpu") and not cg.uses_v2("memory")
