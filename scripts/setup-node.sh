#!/usr/bin/env bash
# Installs the Debian packages that the node, kernel and VM tests and the demo need (mmdebstrap and
# cpio also build the agent image, scripts/build-agent-image.sh, which the node tests run).
# Idempotent; safe to run on every `make test`. Waits for the dpkg/apt locks (another apt run,
# unattended-upgrades) instead of failing.
set -euo pipefail
pkgs=(containerd runc containernetworking-plugins iperf3 busybox-static iproute2 kmod
      qemu-system-x86 e2fsprogs cpio openssl mmdebstrap)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# How long to wait for a lock another apt or dpkg holds.
lock_wait_s=${KUBECTL_CHAOS_APT_LOCK_WAIT:-900}
apt_get() {
    # DPkg::Lock::Timeout makes apt wait for the dpkg frontend lock; `apt-get update` also takes the
    # lists lock, which it does not wait for: retry while it says the lock is held.
    local deadline=$((SECONDS + lock_wait_s)) out
    while :; do
        if out=$(apt-get -o DPkg::Lock::Timeout="$lock_wait_s" "$@" 2>&1); then
            return 0
        fi
        if ! grep -qi "could not get lock\|unable to lock\|is another process using it" <<<"$out" || ((SECONDS > deadline)); then
            echo "$out" >&2
            return 1
        fi
        sleep 3
    done
}
if ((${#missing[@]})); then
    apt_get update -qq
    DEBIAN_FRONTEND=noninteractive apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export -f apt_get
export lock_wait_s
# The VM tests boot Debian's cloud kernel (cgroup v2); fetched as a package, unpacked, never installed.
if [ -x scripts/setup-vm.sh ]; then scripts/setup-vm.sh; fi
# The cgroup v2 worker node's disk image (tests/support/v2node.py), built once and cached by its recipe.
if [ -x scripts/build-v2-image.sh ]; then scripts/build-v2-image.sh >/dev/null; fi
