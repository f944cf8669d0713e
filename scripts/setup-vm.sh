#!/usr/bin/env bash
# Fetches Debian's cloud kernel for the cgroup v2 VM tests (tests/support/vm.py) into a cache dir.
# The package is downloaded and unpacked with dpkg -x, never installed. Idempotent: a kernel that
# is already unpacked is left alone. Needs root (apt-get download as root) after `apt-get update`.
#
# Leaves:  $KUBECTL_CHAOS_VM_DIR/<kernel release>/vmlinuz
#          $KUBECTL_CHAOS_VM_DIR/<kernel release>/modules/<name>.ko   (uncompressed, deps included)
#          $KUBECTL_CHAOS_VM_DIR/current -> <kernel release>
set -euo pipefail

cache_dir=${KUBECTL_CHAOS_VM_DIR:-/var/cache/kubectl-chaos/vm}
meta_pkg=${KUBECTL_CHAOS_VM_KERNEL_PKG:-linux-image-cloud-amd64}
# Modules a VM test may insmod (vm.py: Vm(modules=[...])); their dependencies come along.
modules=(veth ifb sch_htb sch_tbf sch_ingress cls_u32 act_mirred)

# The meta package depends on the current ABI's image, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve() {
    apt-cache depends "$meta_pkg" 2>/dev/null |
        awk '$1 ~ /Depends:/ && $2 ~ /^linux-image-[0-9]/ {print $2; exit}'
}
pkg=$(resolve)
if [ -z "$pkg" ]; then
    # No package lists yet (a fresh machine whose other packages were all installed already).
    # setup-node.sh exports apt_get, which waits for another apt's lock; alone, wait through apt's option.
    if declare -F apt_get >/dev/null; then apt_get update -qq; else apt-get -o DPkg::Lock::Timeout=900 update -qq; fi
    pkg=$(resolve)
fi
if [ -z "$pkg" ]; then
    echo "setup-vm: cannot resolve $meta_pkg to a kernel package (is it in the configured apt sources?)" >&2
    exit 1
fi
release=${pkg#linux-image-}
release=${release%-unsigned}
dest=$cache_dir/$release

if [ -f "$dest/.complete" ]; then
    ln -sfn "$release" "$cache_dir/current"
    exit 0
fi

mkdir -p "$cache_dir"
work=$(mktemp -d "$cache_dir/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$pkg" 2>&1 | grep -v 'Download is performed unsandboxed' || true)
deb=$(find "$work" -maxdepth 1 -name '*.deb' -print -quit)
if [ -z "$deb" ]; then
    echo "setup-vm: apt-get download $pkg produced no .deb" >&2
    exit 1
fi
dpkg -x "$deb" "$work/root"

stage=$work/stage
mkdir -p "$stage/modules"
cp "$work/root/boot/vmlinuz-$release" "$stage/vmlinuz"
cp "$work/root/boot/config-$release" "$stage/config"

moddir=$work/root/lib/modules/$release
find_module() {
    # Module file names use '-' or '_' interchangeably with the module name.
    local name=$1 pat
    pat=$(printf '%s' "$name" | sed 's/[-_]/[-_]/g')
    find "$moddir/kernel" -regextype posix-extended -regex ".*/${pat}\.ko(\.xz|\.zst|\.gz)?" -print -quit
}
declare -A done_mods=()
order=()
add_module() {
    local name=$1 file deps dep
    [ -n "${done_mods[$name]:-}" ] && return 0
    done_mods[$name]=1
    file=$(find_module "$name")
    if [ -z "$file" ]; then
        # Built into this kernel: nothing to load.
        grep -Eq "/${name//_/[-_]}\.ko\$" "$moddir/modules.builtin" && return 0
        echo "setup-vm: module $name is neither in $pkg nor built in" >&2
        exit 1
    fi
    # busybox insmod cannot read compressed modules: store them plain.
    local plain=$stage/modules/$name.ko
    case $file in
        *.ko.xz) xz -dc "$file" >"$plain" ;;
        *.ko.zst) zstd -qdc "$file" >"$plain" ;;
        *.ko.gz) gzip -dc "$file" >"$plain" ;;
        *) cp "$file" "$plain" ;;
    esac
    # The .modinfo section holds NUL-separated key=value strings (what modinfo -F depends reads).
    deps=$(tr '\0' '\n' <"$plain" | sed -n 's/^depends=//p' | tr ',' ' ')
    for dep in $deps; do add_module "$dep"; done
    order+=("$name")
}
for m in "${modules[@]}"; do add_module "$m"; done
# Load order: dependencies before the modules that need them.
printf '%s\n' "${order[@]}" >"$stage/modules/order"
echo "$pkg $(dpkg-deb -f "$deb" Version)" >"$stage/package"
touch "$stage/.complete"

rm -rf "$dest"
mv "$stage" "$dest"
ln -sfn "$release" "$cache_dir/current"
echo "setup-vm: kernel $release in $dest"
