#!/usr/bin/env bash
# Builds the chaos-agent container image from this repository, with no registry and no Docker:
#
#   base    Debian bookworm made by mmdebstrap, variant essential + python3 (Debian's 3.11, the same
#           major.minor as the venv, so the venv's pip picks the same binary wheels); no apt, no
#           docs; every .py compiled to unchecked-hash .pyc (the root fs is read-only in the pod,
#           and unchecked-hash .pyc do not depend on the mtimes the layer sets to one value).
#           Cached by the hash of this recipe alone.
#   app     the project's wheel and its dependencies' wheels, built with the venv's pip (`pip wheel`,
#           versions pinned to the venv's so the image runs what the tests ran), installed into
#           /usr/local/lib/python3.11/dist-packages with `--no-index --find-links` (nothing but the
#           wheels built here), /usr/local/bin/chaos-agent for the manifest's command.
#   layout  one tar+gzip layer written by scripts/oci_layout.py: sorted entries, one mtime
#           (SOURCE_DATE_EPOCH), numeric owners, so the same rootfs always gives the same digest.
#
# It runs as root (no USER): the files the agent writes (cpu.cfs_quota_us, memory.limit_in_bytes,
# cpu.max, memory.max) are root's, mode 0644, and so is the runtime's socket (0660). A non-root agent
# would need CAP_DAC_OVERRIDE, which lets it write every host file it can see: more power than uid 0
# owning those files, not less; and its NET_ADMIN would have to be an ambient capability.
#
# Cached by the hash of the recipe (this script, oci_layout.py), the source (the packages that go
# into the wheel, pyproject.toml, README.md) and the pinned dependency versions: a second run with
# the same inputs only prints the directory.
#
# Leaves:  $KUBECTL_CHAOS_AGENT_IMAGE_DIR/<hash>/agent.oci.tar  the OCI image layout (ctr -n k8s.io images import)
#          $KUBECTL_CHAOS_AGENT_IMAGE_DIR/<hash>/rootfs/        what the layer holds (to rebuild and compare)
#          $KUBECTL_CHAOS_AGENT_IMAGE_DIR/<hash>/image.env      IMAGE_NAME=..., MANIFEST_DIGEST=..., ...
#          $KUBECTL_CHAOS_AGENT_IMAGE_DIR/current -> <hash>
# Prints the directory. Needs root, mmdebstrap, the venv (make setup-venv) and the Debian mirror;
# the venv's pip needs its index (or its cache) for the dependency wheels.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache_dir=${KUBECTL_CHAOS_AGENT_IMAGE_DIR:-/var/cache/kubectl-chaos/agent-image}
mirror=${KUBECTL_CHAOS_AGENT_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
python=${KUBECTL_CHAOS_PYTHON:-$repo/.venv/bin/python}
# Every mtime in the layer and the image's created time: a fixed moment, not the build's.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}  # 2024-01-01T00:00:00Z
keep_builds=3  # older <hash> directories are removed (each holds ~2 x the rootfs)
sources=(cri_api cgroupctl netshape daemonset plugin pyproject.toml README.md)
python_version=3.11  # Debian bookworm's python3

cd "$repo"
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$have" != "$python_version" ]; then
    echo "build-agent-image: $python is Python $have; the image's python3 is $python_version, wheels would not match" >&2
    exit 1
fi

# Dependency versions as the venv has them (what the tests ran with); the project itself is not pinned.
pins=$("$python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^kubectl-chaos' | LC_ALL=C sort)
source_hash=$(find "${sources[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)
base_hash=$( { sed -n '/^# ---- base ----$/,/^# ---- end base ----$/p' "$0"; echo "$mirror $suite"; } | sha256sum | cut -c1-16)
recipe_hash=$( { cat "$0" scripts/oci_layout.py; echo "$mirror $suite $SOURCE_DATE_EPOCH"; echo "$pins"; echo "$source_hash"; } \
    | sha256sum | cut -c1-16)
dest=$cache_dir/$recipe_hash
image_name=localhost/kubectl-chaos/agent:$recipe_hash

if [ -f "$dest/.complete" ]; then
    ln -sfn "$recipe_hash" "$cache_dir/current"
    echo "$dest"
    exit 0
fi
mkdir -p "$cache_dir"
# One build at a time per cache: a second session waits, then finds the first one's result.
exec 9>"$cache_dir/.lock"
flock 9
if [ -f "$dest/.complete" ]; then
    ln -sfn "$recipe_hash" "$cache_dir/current"
    echo "$dest"
    exit 0
fi
work=$(mktemp -d "$cache_dir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
quiet() {  # run "$@" with its stderr kept aside; shown only when it fails (pip's warnings are noise here)
    "$@" 2>"$work/stderr.log" || { local rc=$?; cat "$work/stderr.log" >&2; return $rc; }
}

# ---- base ----
# Debian bookworm, essential + python3, from a private apt configuration (mmdebstrap's own; the
# host's sources are never read or changed). No apt in the image: nothing installs at run time.
base=$cache_dir/base-$base_hash
if [ ! -f "$base/.complete" ]; then
    # libstdc++6: grpcio's C++ core (its manylinux wheel links it from the system).
    mmdebstrap --quiet --variant=essential --include=python3,libstdc++6 \
        --aptopt='Acquire::Languages "none"' \
        --dpkgopt='path-exclude=/usr/share/{doc,man,locale,info,lintian,linda}/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" >"$1/usr/share/kubectl-chaos-packages.txt"' \
        "$suite" "$work/base" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"
    # Cleaned after mmdebstrap is done (in a hook /dev and the caches may still be its mounts);
    # /dev's nodes stay here, the layer leaves them out.
    rm -rf "$work/base"/var/cache/* "$work/base"/var/lib/apt/lists/* "$work/base"/var/log/*
    # Debian's own .pyc (py3compile at install) are timestamp-checked against the .py mtimes, which the
    # layer replaces: recompiled as unchecked-hash so the read-only root never recompiles at start.
    # The venv's python writes them (same 3.11 bytecode); -s/-p keep the image's paths in them.
    "$python" -m compileall -q -f -j 2 --invalidation-mode unchecked-hash -s "$work/base" -p / \
        "$work/base/usr/lib/python3.11" "$work/base/usr/lib/python3/dist-packages" >/dev/null
    touch "$work/base/.complete"
    rm -rf "$base"
    mv "$work/base" "$base"
fi
# ---- end base ----
t_base=$((SECONDS - t0))

# ---- app ----
# The wheel is built from a copy of exactly the hashed files (no build/ or egg-info left in the tree).
mkdir -p "$work/src" "$work/wheels"
find "${sources[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | cpio -0 -pdm --quiet "$work/src"
echo "$pins" >"$work/constraints.txt"
quiet "$python" -m pip wheel --quiet --disable-pip-version-check --no-build-isolation \
    --constraint "$work/constraints.txt" --wheel-dir "$work/wheels" "$work/src"
root=$work/rootfs
cp -a "$base" "$root"
rm -f "$root/.complete"
site=/usr/local/lib/python3.11/dist-packages
# --target: the host's pip would otherwise choose its own scheme (site-packages, not Debian's
# dist-packages); --no-compile: compiled below for the image's paths.
quiet "$python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$work/wheels" \
    --no-compile --target "$root$site" kubectl-chaos
# The console scripts pip wrote name the venv's python: rewritten for the image's, from the
# wheel's own entry points (chaos-agent for the manifest's command).
rm -rf "$root$site/bin"
"$python" - "$root" "$site" <<'EOF'
import configparser, pathlib, sys
root, site = pathlib.Path(sys.argv[1]), sys.argv[2]
(dist,) = (root / site.lstrip("/")).glob("kubectl_chaos-*.dist-info")
ep = configparser.ConfigParser(delimiters=("=",))
ep.optionxform = str
ep.read(dist / "entry_points.txt")
for name, target in ep["console_scripts"].items():
    module, func = (s.strip() for s in target.split(":"))
    script = root / "usr/local/bin" / name
    script.write_text(f"#!/usr/bin/python3\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    script.chmod(0o755)
EOF
"$python" -m compileall -q -f -j 2 --invalidation-mode unchecked-hash -s "$root" -p / "$root$site" >/dev/null
chroot "$root" /usr/bin/python3 -c 'import daemonset.agent, cri_api, cgroupctl, netshape, grpc, pyroute2, kubernetes'
# ---- end app ----
t_app=$((SECONDS - t0 - t_base))

stage=$work/stage
mkdir -p "$stage"
"$python" scripts/oci_layout.py --rootfs "$root" --out "$stage/agent.oci.tar" --name "$image_name" \
    --entrypoint /usr/local/bin/chaos-agent \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env PYTHONUNBUFFERED=1 --env PYTHONDONTWRITEBYTECODE=1 \
    --json >"$work/layout.json"
t_layout=$((SECONDS - t0 - t_base - t_app))
"$python" - "$work/layout.json" "$image_name" "$stage/image.env" "$SOURCE_DATE_EPOCH" "$root" \
    "$t_base" "$t_app" "$t_layout" "$((SECONDS - t0))" <<'EOF'
import json, pathlib, sys
doc = json.loads(pathlib.Path(sys.argv[1]).read_text())
root = pathlib.Path(sys.argv[5])
rootfs_bytes = sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
lines = {
    "IMAGE_NAME": sys.argv[2],
    "MANIFEST_DIGEST": doc["manifest"]["digest"],
    "CONFIG_DIGEST": doc["config"]["digest"],
    "LAYER_DIGEST": doc["layer"]["digest"],
    "LAYER_DIFF_ID": doc["layer_diff_id"],
    "LAYER_BYTES": doc["layer"]["size_bytes"],
    "ROOTFS_BYTES": rootfs_bytes,
    "SOURCE_DATE_EPOCH": sys.argv[4],
    "BUILD_BASE_S": sys.argv[6],
    "BUILD_APP_S": sys.argv[7],
    "BUILD_LAYOUT_S": sys.argv[8],
    "BUILD_TOTAL_S": sys.argv[9],
}
pathlib.Path(sys.argv[3]).write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
EOF
mv "$root" "$stage/rootfs"
touch "$stage/.complete"
rm -rf "$dest"
mv "$stage" "$dest"
ln -sfn "$recipe_hash" "$cache_dir/current"

# Older builds (of older sources) go, the newest few stay (another session may still import one).
ls -1dt "$cache_dir"/????????????????/ 2>/dev/null | tail -n +$((keep_builds + 1)) | xargs -r rm -rf
ls -1dt "$cache_dir"/base-*/ 2>/dev/null | tail -n +3 | xargs -r rm -rf
echo "$dest"
