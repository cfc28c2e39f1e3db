#!/usr/bin/env bash
# Build the coloproxy test guest: Debian's cloud kernel plus a busybox initramfs; a virtio
# disk is optional (coloproxy.disk=vda). See guest/README.md.
#
# The result is cached outside the work tree, keyed by kernel version and a hash of guest/:
#   ${COLOPROXY_CACHE:-/var/cache/coloproxy}/guest/<kernel-version>-<hash>/vmlinuz
#   ${COLOPROXY_CACHE:-/var/cache/coloproxy}/guest/<kernel-version>-<hash>/initrd.gz
# and .../guest/current points at the latest build. A second run returns at once. The
# image directory is the only line on stdout; progress goes to stderr. Run as root.
#
#   guest/build.sh           build if needed, print the image directory
#   guest/build.sh --force   rebuild even if cached
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${COLOPROXY_CACHE:-/var/cache/coloproxy}/guest
force=0
[ "${1:-}" = "--force" ] && force=1

say() { echo "guest/build.sh: $*" >&2; }
die() { echo "guest/build.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (reads /boot, installs packages)"
export DEBIAN_FRONTEND=noninteractive

# Loaded in this order by /init: the dependency order of virtio_net and virtio_pci in
# Debian's cloud kernel (other orders fail with unknown symbols).
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         failover net_failover virtio_net)
# Loaded after those, only with coloproxy.disk= (guest/README.md "The disk"): ext4 and the
# virtio disk, in dependency order. Debian's cloud kernel has ext4 built in; built-in ones
# are skipped.
disk_modules=(crc16 mbcache jbd2 ext4 virtio_blk)

deps=(busybox-static cpio gzip gcc libc6-dev xz-utils zstd python3 e2fsprogs)
missing=()
for pkg in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "apt-get install ${missing[*]}"
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
fi

# The newest cloud kernel whose modules are installed.
find_kernel() {
    local v
    for v in $(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -rV); do
        if [ -f "/lib/modules/$v/modules.dep" ]; then
            echo "$v"
            return
        fi
    done
}
kver=$(find_kernel)
if [ -z "$kver" ]; then
    say "no cloud kernel in /boot: apt-get install linux-image-cloud-amd64"
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends linux-image-cloud-amd64 >&2 \
        || die "apt-get install linux-image-cloud-amd64 failed"
    kver=$(find_kernel)
    [ -n "$kver" ] || die "linux-image-cloud-amd64 installed but no /boot/vmlinuz-*-cloud-amd64 with modules"
fi

busybox_version=$(dpkg-query -W -f='${Version}' busybox-static)
hash=$( (cat "$here/build.sh" "$here/init" "$here/cpx.c"; echo "$busybox_version") \
        | sha256sum | cut -c1-12)
dest=$cache_root/$kver-$hash

cached() {
    if [ "$force" = 0 ] && [ -f "$dest/BUILD-INFO" ]; then
        say "cached: $dest (kernel $kver)"
        ln -sfn "$dest" "$cache_root/current"
        echo "$dest"
        exit 0
    fi
}
cached
# One build at a time: wait for a concurrent run, then use what it built.
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9
cached

say "building the guest image: kernel $kver, busybox-static $busybox_version"
stage=$(mktemp -d /var/tmp/coloproxy-guest.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,usr/bin,usr/sbin,lib/modules,www/cgi-bin}

busybox=$(command -v busybox)
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' \
    || ldd "$busybox" 2>&1 | grep -q 'not a dynamic executable' \
    || die "$busybox is not static (install busybox-static)"
cp "$busybox" "$root/bin/busybox"
say "gcc -static guest/cpx.c"
gcc -static -O2 -Wall -Wextra -Werror -o "$root/bin/cpx" "$here/cpx.c" \
    || die "cannot build guest/cpx.c"
strip "$root/bin/cpx"
install -m 0755 "$here/init" "$root/init"

# mkfs.ext4 for a blank disk: e2fsprogs' mke2fs with its shared libraries (busybox's mke2fs
# makes ext2 only, and ext2 has no journal: after a crash or a kill of the VM its bitmaps
# can be stale and the next file created makes the kernel remount it read-only).
mke2fs=$(command -v mke2fs || echo /sbin/mke2fs)
[ -x "$mke2fs" ] || die "no mke2fs (install e2fsprogs)"
install -D -m 0755 "$mke2fs" "$root/usr/sbin/mkfs.ext4"
for lib in $(ldd "$mke2fs" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
[ -f /etc/mke2fs.conf ] && install -D -m 0644 /etc/mke2fs.conf "$root/etc/mke2fs.conf"
chroot "$root" /usr/sbin/mkfs.ext4 -V >/dev/null 2>&1 \
    || die "$mke2fs does not run inside the guest's root (a library missing?)"

# The modules, uncompressed (busybox insmod may not read .ko.xz / .ko.zst); the load orders
# go to lib/modules/order (always) and lib/modules/order.disk (with a disk).
: >"$root/lib/modules/order"
: >"$root/lib/modules/order.disk"
for mod in "${modules[@]}" "${disk_modules[@]}"; do
    rel=$(awk -F: -v m="$mod" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko(\.xz|\.zst|\.gz)?$/, "", n);
                                 if (n == m) { print $1; exit } }' "/lib/modules/$kver/modules.dep")
    if [ -z "$rel" ]; then
        grep -q "/$mod.ko" "/lib/modules/$kver/modules.builtin" 2>/dev/null \
            && { say "$mod is built in"; continue; }
        die "module $mod not found for kernel $kver"
    fi
    src=/lib/modules/$kver/$rel
    case $src in
        *.ko.xz) xz -dc "$src" >"$root/lib/modules/$mod.ko" ;;
        *.ko.zst) zstd -qdc "$src" >"$root/lib/modules/$mod.ko" ;;
        *.ko.gz) gzip -dc "$src" >"$root/lib/modules/$mod.ko" ;;
        *) cp "$src" "$root/lib/modules/$mod.ko" ;;
    esac
    order=order
    [[ " ${disk_modules[*]} " == *" $mod "* ]] && order=order.disk
    echo "$mod" >>"$root/lib/modules/$order"
done
# Every dependency of virtio_net, virtio_pci, virtio_blk and ext4 must be in the lists above.
for mod in virtio_net virtio_pci virtio_blk ext4; do
    deps_of=$(awk -F': *' -v m="$mod" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko.*$/, "", n);
                                         if (n == m) { print $2; exit } }' "/lib/modules/$kver/modules.dep")
    for dep in $deps_of; do
        d=$(basename "$dep"); d=${d%%.ko*}
        grep -qx "$d" "$root/lib/modules/order" "$root/lib/modules/order.disk" \
            || grep -q "/$d.ko" "/lib/modules/$kver/modules.builtin" 2>/dev/null \
            || die "kernel $kver: $mod needs $d, which is not in guest/build.sh's module list"
    done
done
say "modules: $(tr '\n' ' ' <"$root/lib/modules/order")" \
    "with a disk: $(tr '\n' ' ' <"$root/lib/modules/order.disk")"
for applet in mount sync; do
    "$root/bin/busybox" --list | grep -x "$applet" >/dev/null \
        || die "$busybox has no $applet applet (the guest's disk needs it)"
done

# Web content. big.bin: 384 KiB of SHA-256 counter-mode bytes, the same on every build.
cat >"$root/www/index.html" <<'EOF'
<!DOCTYPE html>
<html><head><title>coloproxy test guest</title></head>
<body><h1>coloproxy test guest</h1>
<p>Deterministic pages: /index.html, /big.bin. Nondeterministic: /cgi-bin/clock.
Memory checker: /cgi-bin/memcheck.</p></body></html>
EOF
python3 - "$root/www/big.bin" <<'PY'
import hashlib, sys
with open(sys.argv[1], "wb") as f:
    for i in range(384 * 1024 // 32):
        f.write(hashlib.sha256(b"coloproxy big.bin %d" % i).digest())
PY
cat >"$root/www/cgi-bin/clock" <<'EOF'
#!/bin/sh
exec /bin/cpx clock
EOF
cat >"$root/www/cgi-bin/memcheck" <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
cat /run/memcheck.status 2>/dev/null || echo "memcheck not running"
EOF
cat >"$root/www/cgi-bin/diskcheck" <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
cat /run/diskcheck.status 2>/dev/null || echo "diskcheck not running"
EOF
# The disk's acknowledged records (guest/cpx.c): ?n=K appends K, diskverify checks them all.
cat >"$root/www/cgi-bin/diskwrite" <<'EOF'
#!/bin/sh
exec /bin/cpx diskwrite
EOF
cat >"$root/www/cgi-bin/diskverify" <<'EOF'
#!/bin/sh
exec /bin/cpx diskverify
EOF
cat >"$root/www/cgi-bin/upload" <<'EOF'
#!/bin/sh
# POST: reads the whole body and answers its length and MD5 (the same on both guests).
n=${CONTENT_LENGTH:-0}
sum=$(head -c "$n" | md5sum)
printf 'Content-Type: text/plain\r\n\r\n'
echo "bytes=$n md5=${sum%% *}"
EOF
chmod 0755 "$root/www/cgi-bin/"*

mknod -m 0600 "$root/dev/console" c 5 1
mknod -m 0666 "$root/dev/null" c 1 3

# A reproducible archive: fixed mtimes, sorted names, no gzip timestamp.
find "$root" -exec touch -h -d @0 {} +
mkdir -p "$stage/out"
(cd "$root" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc --owner=0:0 --reproducible --quiet) | gzip -n -9 >"$stage/out/initrd.gz"
cp "/boot/vmlinuz-$kver" "$stage/out/vmlinuz"
cat >"$stage/out/BUILD-INFO" <<EOF
kernel_version=$kver
busybox_static=$busybox_version
e2fsprogs=$(dpkg-query -W -f='${Version}' e2fsprogs)
guest_hash=$hash
modules=${modules[*]}
disk_modules=${disk_modules[*]}
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
chmod 0644 "$stage/out/"*
mkdir -p "$cache_root"
rm -rf "$dest"
mv "$stage/out" "$dest"
ln -sfn "$dest" "$cache_root/current"
say "built: $dest (initrd $(du -h "$dest/initrd.gz" | cut -f1))"
echo "$dest"
