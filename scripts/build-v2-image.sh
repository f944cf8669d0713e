#!/usr/bin/env bash
# Builds the cgroup v2 worker node's disk image (tests/support/v2node.py boots it under QEMU):
# Debian forky, systemd as PID 1, containerd 2.x (CRI config version 3, SystemdCgroup = true for
# the runc and crun handlers), the CNI bridge, iperf3, socat, python3 and the cloud kernel.
#
# Built with mmdebstrap from its own apt configuration (the host's sources are never touched),
# cached by the hash of this recipe: a second run with the same recipe only prints the path.
#
# Leaves:  $KUBECTL_CHAOS_V2_DIR/<recipe hash>/rootfs.img    ext4, the root disk (booted as a snapshot)
#          $KUBECTL_CHAOS_V2_DIR/<recipe hash>/vmlinuz       the image's kernel
#          $KUBECTL_CHAOS_V2_DIR/<recipe hash>/initrd.cpio   busybox + virtio_blk: mounts the disk, switch_root
#          $KUBECTL_CHAOS_V2_DIR/<recipe hash>/versions.txt  package versions (kernel, systemd, containerd, ...)
#          $KUBECTL_CHAOS_V2_DIR/current -> <recipe hash>
# Prints the directory. Needs root, mmdebstrap, e2fsprogs, busybox-static, cpio.
set -euo pipefail

cache_dir=${KUBECTL_CHAOS_V2_DIR:-/var/cache/kubectl-chaos/v2}
mirror=${KUBECTL_CHAOS_V2_MIRROR:-http://deb.debian.org/debian}
suite=${KUBECTL_CHAOS_V2_SUITE:-forky}
disk_size=${KUBECTL_CHAOS_V2_DISK:-2G}
packages=(
    linux-image-cloud-amd64 systemd systemd-sysv dbus udev kmod iproute2 procps
    containerd runc crun containernetworking-plugins iperf3 socat python3
)
# Loaded at boot (systemd-modules-load): networking for QEMU, pods, and the traffic shaping.
modules=(virtio_net overlay veth bridge ifb sch_htb sch_tbf sch_ingress cls_u32 act_mirred)

script_dir=$(cd "$(dirname "$0")" && pwd)
recipe_hash=$( { cat "$0"; echo "$mirror $suite $disk_size"; } | sha256sum | cut -c1-16)
dest=$cache_dir/$recipe_hash

if [ -f "$dest/.complete" ]; then
    ln -sfn "$recipe_hash" "$cache_dir/current"
    echo "$dest"
    exit 0
fi
mkdir -p "$cache_dir"
work=$(mktemp -d "$cache_dir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# The files the customize hook puts in the image.
mkdir -p "$work/files"
cat >"$work/files/config.toml" <<'EOF'
# containerd 2.x, CRI config version 3, as a kubelet with --cgroup-driver=systemd needs it.
version = 3
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "localhost/kubectl-chaos/pause:test"
[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.crun]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.crun.options]
        BinaryName = "/usr/bin/crun"
        SystemdCgroup = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "/etc/cni/net.d"
EOF
cat >"$work/files/10-kcx.conflist" <<'EOF'
{"cniVersion": "1.0.0", "name": "kcx", "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": true,
 "ipMasq": false, "hairpinMode": true, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]],
 "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
# The project disk (second virtio disk, made per boot by v2node.py) holds the code and the guest
# driver; this unit mounts it, brings up QEMU's user network and starts the driver on TCP 7000.
cat >"$work/files/kcx-driver.service" <<'EOF'
[Unit]
Description=kubectl-chaos test driver (tests/support/v2guest.py)
After=containerd.service dbus.service systemd-modules-load.service
Wants=containerd.service dbus.service
[Service]
ExecStartPre=/bin/mkdir -p /opt/kcx
ExecStartPre=/bin/mount -o ro /dev/vdb /opt/kcx
ExecStartPre=/usr/sbin/ip link set lo up
ExecStartPre=/usr/sbin/ip link set eth0 up
ExecStartPre=/usr/sbin/ip addr add 10.0.2.15/24 dev eth0
ExecStartPre=/usr/sbin/ip route add default via 10.0.2.2
Environment=PYTHONPATH=/opt/kcx/src:/opt/kcx/site PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
ExecStart=/usr/bin/python3 -m tests.support.v2guest --listen 0.0.0.0:7000
StandardOutput=journal+console
StandardError=journal+console
[Install]
WantedBy=multi-user.target
EOF
printf '%s\n' "${modules[@]}" >"$work/files/kcx-modules.conf"

include=$(IFS=,; echo "${packages[*]}")
# forky's Release file can be past its Valid-Until date; signed by the archive keys of the host's keyring.
mmdebstrap --quiet --variant=minbase --include="$include" \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/{doc,man,locale,info}/*' \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    --customize-hook='cp "'"$work"'/files/config.toml" "$1/etc/containerd/config.toml"' \
    --customize-hook='mkdir -p "$1/etc/cni/net.d" && cp "'"$work"'/files/10-kcx.conflist" "$1/etc/cni/net.d/"' \
    --customize-hook='cp "'"$work"'/files/kcx-driver.service" "$1/etc/systemd/system/"' \
    --customize-hook='cp "'"$work"'/files/kcx-modules.conf" "$1/etc/modules-load.d/kcx.conf"' \
    --customize-hook='chroot "$1" systemctl enable kcx-driver.service containerd.service' \
    --customize-hook='chroot "$1" systemctl mask getty@tty1.service serial-getty@ttyS0.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer 2>/dev/null || true' \
    --customize-hook='echo kcx-v2 >"$1/etc/hostname"; echo "/dev/vda / ext4 rw 0 1" >"$1/etc/fstab"; : >"$1/etc/machine-id"' \
    --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" linux-image-cloud-amd64 systemd containerd runc crun containernetworking-plugins iperf3 python3 >"'"$work"'/versions.txt"' \
    "$suite" "$root" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"

stage=$work/stage
mkdir -p "$stage"
release=$(basename "$(ls -d "$root"/lib/modules/* | head -1)")
echo "kernel $release" >>"$work/versions.txt"
cp "$root/boot/vmlinuz-$release" "$stage/vmlinuz"

# A tiny initramfs: busybox, virtio_blk (and what it needs) uncompressed, an init that mounts
# /dev/vda and hands over to systemd.
initrd=$work/initrd
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,modules}
cp /bin/busybox "$initrd/bin/busybox"
for applet in sh mount umount insmod switch_root mkdir sleep echo cat; do ln -s busybox "$initrd/bin/$applet"; done
moddir=$root/lib/modules/$release
declare -A seen=()
order=()
add_module() {  # $1: path relative to $moddir, as modules.dep names it
    local rel=$1 dep
    [ -n "${seen[$rel]:-}" ] && return 0
    seen[$rel]=1
    for dep in $(awk -v m="$rel:" '$1 == m { $1 = ""; print }' "$moddir/modules.dep"); do add_module "$dep"; done
    local name
    name=$(basename "$rel"); name=${name%%.ko*}
    case $rel in
        *.ko.xz) xz -dc "$moddir/$rel" ;;
        *.ko.zst) zstd -qdc "$moddir/$rel" ;;
        *.ko.gz) gzip -dc "$moddir/$rel" ;;
        *) cat "$moddir/$rel" ;;
    esac >"$initrd/modules/$name.ko"
    order+=("$name")
}
for m in virtio_blk ext4; do
    rel=$(awk -F: -v m="$m" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko.*/, "", n); gsub(/-/, "_", n) } n == m { print $1; exit }' "$moddir/modules.dep")
    [ -n "$rel" ] && add_module "$rel"  # else built in
done
printf '%s\n' "${order[@]}" >"$initrd/modules/order"
cat >"$initrd/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko 2>/dev/null; done
for i in $(seq 1 100 2>/dev/null || echo 1 2 3 4 5 6 7 8 9 10); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 -o rw /dev/vda /newroot || { echo "kcx-initrd: cannot mount /dev/vda"; sleep 5; echo o >/proc/sysrq-trigger; }
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
EOF
ln -s busybox "$initrd/bin/seq"
chmod +x "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet) >"$stage/initrd.cpio"

rm -rf "$root/boot"/vmlinuz-* "$root/boot"/initrd.img-* "$root/var/cache/apt"/*.bin "$root/var/lib/apt/lists"/*_Packages
mke2fs -q -t ext4 -L kcx-root -d "$root" "$stage/rootfs.img" "$disk_size"
cp "$work/versions.txt" "$stage/versions.txt"
touch "$stage/.complete"
rm -rf "$dest"
mv "$stage" "$dest"
ln -sfn "$recipe_hash" "$cache_dir/current"
echo "$dest"
