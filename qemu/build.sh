#!/usr/bin/env bash
# Build the QEMU that coloproxy's COLO lab runs: Debian's own QEMU source package (the
# version installed here, or the archive's candidate), plus the patches in
# qemu/patches/<major.minor>/, configured for x86_64-softmmu only.
#
# The result is cached outside the work tree, keyed by the Debian source version and a hash
# of the patches and this script:
#   ${COLOPROXY_CACHE:-/var/cache/coloproxy}/qemu/<version>-<hash>/bin/qemu-system-x86_64
#   ${COLOPROXY_CACHE:-/var/cache/coloproxy}/qemu/<version>-<hash>/share/qemu/  (firmware)
# A second run finds the cache and returns at once. The binary's path is the only line on
# stdout; progress goes to stderr; .../qemu/current points at the latest build. Run as root
# (apt). See qemu/README.md.
#
#   qemu/build.sh            build if needed, print the binary's path
#   qemu/build.sh --force    rebuild even if cached
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${COLOPROXY_CACHE:-/var/cache/coloproxy}/qemu
work_root=${COLOPROXY_BUILD_DIR:-/var/tmp/coloproxy-build/qemu}
jobs=${COLOPROXY_BUILD_JOBS:-2}
force=0
[ "${1:-}" = "--force" ] && force=1

say() { echo "qemu/build.sh: $*" >&2; }
die() { echo "qemu/build.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs build dependencies with apt-get)"
[ -r /etc/os-release ] || die "/etc/os-release missing: not a Debian system?"
# shellcheck disable=SC1091
. /etc/os-release
[ "${ID:-}" = debian ] || die "Debian only (found ID=${ID:-?})"
codename=${VERSION_CODENAME:?VERSION_CODENAME missing in /etc/os-release}
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_update() {
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
}

# Which QEMU source: the one the installed qemu-system-x86 was built from, else the
# archive's candidate (so the patched binary matches Debian's stock one where both exist).
source_version() {
    local v
    v=$(dpkg-query -W -f='${db:Status-Abbrev} ${source:Version}' qemu-system-x86 2>/dev/null \
        | awk '$1 == "ii" {print $2}') || true
    if [ -z "$v" ]; then
        apt_update
        v=$(apt-cache show --no-all-versions qemu-system-x86 2>/dev/null \
            | awk -F': ' '/^Source: /{ if (match($2, /\(([^)]*)\)/)) src=substr($2, RSTART+1, RLENGTH-2) }
                          /^Version: /{ ver=$2 } END { print (src != "" ? src : ver) }')
    fi
    [ -n "$v" ] || die "cannot tell which QEMU version to build (qemu-system-x86 unknown to apt)"
    echo "$v"
}

version=$(source_version)
upstream=${version#*:}            # 1:7.2+dfsg-7+deb12u18 -> 7.2+dfsg-7+deb12u18
upstream=${upstream%%[+~-]*}      # -> 7.2 / 10.0.13
series=$(echo "$upstream" | cut -d. -f1-2)
patch_dir=$here/patches/$series
[ -d "$patch_dir" ] || die "no patch set for QEMU $series ($version): expected $patch_dir"
mapfile -t patches < <(find "$patch_dir" -maxdepth 1 -name '*.patch' | sort)

# Only what COLO needs: TCG and KVM, replication (migration/colo.c aborts without it; it also
# keeps block replication), the colo-compare / filter-* objects (always built in net/), fdt
# (the microvm machine, always part of x86_64-softmmu). Everything else is off: no GUI, VNC,
# audio, slirp, tools, docs. No firmware blobs: Debian's source has none (they are copied
# from Debian's packages below).
configure_flags=(
    --target-list=x86_64-softmmu
    --without-default-features
    --enable-tcg
    --enable-kvm
    --enable-replication
    --enable-fdt=system
    --disable-install-blobs
    --disable-docs
    --disable-debug-info
    --disable-werror
)
# Bump when the way the cache directory is filled changes (e.g. the firmware list).
recipe=1

# The cache key covers what changes the binary: source version, patches, configure flags.
hash=$( (cat "${patches[@]}"; echo "recipe=$recipe ${configure_flags[*]}") | sha256sum | cut -c1-12)
key="$(echo "$version" | tr ':~' '._')-$hash"
dest=$cache_root/$key
binary=$dest/bin/qemu-system-x86_64

cached() {
    if [ "$force" = 0 ] && [ -x "$binary" ] && [ -f "$dest/BUILD-INFO" ]; then
        say "cached: $dest (QEMU $version, patch set $series)"
        ln -sfn "$dest" "$cache_root/current"
        echo "$binary"
        exit 0
    fi
}
cached
# One build at a time (tests and set-up may start this script concurrently): wait for the
# other one, then use what it built.
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
if ! flock -n 9; then
    say "another qemu/build.sh is running: waiting for it"
    flock 9
fi
cached

start=$(date +%s)
say "building QEMU $version (Debian $VERSION_ID $codename) with $(( ${#patches[@]} )) patches from $patch_dir"

# --- build dependencies: explicit and minimal ---------------------------------------------
# gcc/make/ninja/meson/pkg-config: the build; glib, pixman, zlib, fdt: what x86_64-softmmu
# links (fdt for the microvm machine, which the target always includes);
# python3-venv: QEMU >= 8.1's configure makes a venv; dpkg-dev: dpkg-source to unpack;
# seabios, ipxe-qemu, qemu-system-data: the firmware files copied next to the binary.
deps=(gcc make ninja-build meson pkg-config python3 python3-venv libglib2.0-dev
      libpixman-1-dev zlib1g-dev libfdt-dev dpkg-dev patch xz-utils seabios ipxe-qemu qemu-system-data)
missing=()
for pkg in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    apt_update
    say "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
fi

# --- deb-src: add the machine's own release if no source entry exists ---------------------
# Derived from the enabled binary entries (one-line sources.list or deb822 .sources) whose
# suites belong to this release: same URIs, suites, components and keyring, type deb-src.
src_list=/etc/apt/sources.list.d/coloproxy-deb-src.sources
if ! apt-cache showsrc qemu 2>/dev/null | grep -q '^Package: qemu$'; then
    apt_update
fi
if ! apt-cache showsrc qemu 2>/dev/null | grep -q '^Package: qemu$'; then
    say "no deb-src entry for qemu: writing $src_list"
    python3 - "$codename" "$src_list" <<'PY' || die "could not derive a deb-src entry from the apt sources"
import glob, re, sys

codename, out = sys.argv[1], sys.argv[2]
entries = []  # (uris, suites, components, signed_by)

def keep(suites):
    return suites and all(s == codename or s.startswith(codename + "-") for s in suites)

for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line.split("#", 1)[0])
        if not m:
            continue
        opts, uri, suite, comps = m.group(1) or "", m.group(2), m.group(3), m.group(4).split()
        signed = re.search(r"signed-by=(\S+?)\]?(\s|$)", opts)
        if keep([suite]):
            entries.append(([uri], [suite], comps, signed.group(1) if signed else None))

for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    if path == out:
        continue
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            name, value = line.split(":", 1)
            fields[name.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        if keep(suites):
            entries.append((fields.get("uris", "").split(), suites,
                            fields.get("components", "main").split(), fields.get("signed-by")))

if not entries:
    sys.exit("no enabled deb entry for " + codename)
with open(out, "w") as f:
    f.write("# Written by coloproxy qemu/build.sh: source entries for `apt-get source qemu`,\n"
            "# derived from this machine's own binary entries.\n")
    for uris, suites, comps, signed in entries:
        f.write("\nTypes: deb-src\nURIs: %s\nSuites: %s\nComponents: %s\n"
                % (" ".join(uris), " ".join(suites), " ".join(comps)))
        if signed and "\n" not in signed:
            f.write("Signed-By: %s\n" % signed)
PY
    sed 's/^/    /' "$src_list" >&2
    apt_updated=0
    apt_update
fi

# --- source -------------------------------------------------------------------------------
work=$work_root/$key
rm -rf "$work"
mkdir -p "$work"
cd "$work"
say "apt-get source qemu=$version (in $work)"
if ! apt-get source --download-only -qq "qemu=$version" >&2 2>"$work/apt-source.log"; then
    cat "$work/apt-source.log" >&2
    die "apt-get source qemu=$version failed (is that version still in the archive? try 'apt-get update' or upgrading qemu-system-x86)"
fi
say "dpkg-source -x (applies Debian's own patches)"
dpkg-source -x --no-check ./*.dsc src >"$work/dpkg-source.log" 2>&1 \
    || { tail -20 "$work/dpkg-source.log" >&2; die "dpkg-source -x failed"; }
cd src

# A patch that upstream already carries (e.g. the 10.0.7 COLO fix in a later 10.0.x) is
# skipped: it reverse-applies cleanly.
applied=()
for p in "${patches[@]}"; do
    name=$(basename "$p")
    if patch -p1 --forward --dry-run -s <"$p" >/dev/null 2>&1; then
        patch -p1 --forward -s <"$p" >&2 || die "patch $name failed"
        say "applied $name"
        applied+=("$name")
    elif patch -p1 -R --dry-run -s <"$p" >/dev/null 2>&1; then
        say "skipped $name: already in QEMU $version"
    else
        patch -p1 --forward --dry-run <"$p" >&2 || true
        die "patch $name does not apply to QEMU $version"
    fi
done

# --- configure and build ------------------------------------------------------------------
tmp_dest=$dest.tmp.$$
rm -rf "$tmp_dest"
mkdir -p build
cd build
say "configure"
# Debian's python3 (PYTHON, which 7.2 and 10.0 both read; 7.2 refuses --python without its
# embedded meson), not whatever python3 comes first in PATH (pyenv here): QEMU >= 8.1's
# configure looks for the meson module in the interpreter it runs.
PYTHON=/usr/bin/python3 ../configure --prefix="$dest" --firmwarepath="$dest/share/qemu" "${configure_flags[@]}" \
    >"$work/configure.log" 2>&1 \
    || { tail -30 "$work/configure.log" >&2; die "configure failed (log: $work/configure.log)"; }
grep -iE 'replication support|KVM support|TCG support' "$work/configure.log" | sed 's/^/    /' >&2 || true

say "ninja -j$jobs qemu-system-x86_64 (a few minutes; log: $work/build.log)"
ninja -j"$jobs" qemu-system-x86_64 >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; die "build failed (log: $work/build.log)"; }

# --- install into the cache ---------------------------------------------------------------
mkdir -p "$tmp_dest/bin" "$tmp_dest/share/qemu"
install -m 0755 qemu-system-x86_64 "$tmp_dest/bin/qemu-system-x86_64"
# Firmware for -machine pc, -kernel boot and the NIC option ROMs, copied (symlinks resolved)
# from Debian's packages so the cache stands alone.
for f in /usr/share/seabios/bios-256k.bin /usr/share/seabios/bios.bin \
         /usr/share/seabios/vgabios*.bin \
         /usr/share/qemu/kvmvapic.bin /usr/share/qemu/linuxboot.bin \
         /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/multiboot.bin \
         /usr/share/qemu/multiboot_dma.bin /usr/share/qemu/pvh.bin \
         /usr/lib/ipxe/qemu/*.rom; do
    [ -e "$f" ] && cp -L "$f" "$tmp_dest/share/qemu/"
done
for f in bios-256k.bin kvmvapic.bin linuxboot_dma.bin; do
    [ -e "$tmp_dest/share/qemu/$f" ] || die "firmware $f not found on this system"
done
"$tmp_dest/bin/qemu-system-x86_64" -L "$tmp_dest/share/qemu" --version >&2 \
    || die "the built binary does not run"

end=$(date +%s)
cat >"$tmp_dest/BUILD-INFO" <<EOF
qemu_source_version=$version
patch_series=$series
patches_applied=${applied[*]}
patch_hash=$hash
debian=$VERSION_ID $codename
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$((end - start))
EOF
rm -rf "$dest"
mv "$tmp_dest" "$dest"
ln -sfn "$dest" "$cache_root/current"
# The source tree is only needed to rebuild; keep the logs.
rm -rf "$work/src"
say "built in $((end - start)) s: $dest"
echo "$binary"
