#!/usr/bin/env bash
# Installs the Debian packages that the node, kernel and VM tests and the demo need.
# Idempotent; safe to run on every `make test`.
set -euo pipefail
pkgs=(containerd runc containernetworking-plugins iperf3 busybox-static iproute2 kmod
      qemu-system-x86 e2fsprogs cpio openssl)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The VM tests boot Debian's cloud kernel (cgroup v2); fetched as a package, unpacked, never installed.
if [ -x scripts/setup-vm.sh ]; then scripts/setup-vm.sh; fi
