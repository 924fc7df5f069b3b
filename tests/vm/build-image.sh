#!/usr/bin/env bash
# Builds (or reuses) the guest image for the real-kernel tests: a Debian bookworm root
# file system from Debian's archive with LIO's userspace (targetcli-fb, rtslib, dbus,
# open-iscsi, sg3-utils, fio, ...) and Debian's kernel, packed into an ext4 image
# without loop mounts. Prints the cache directory holding rootfs.img, vmlinuz, initrd.img.
# Cached under /var/cache/lc-vm/<hash of this recipe>; rebuilt when the recipe changes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

PACKAGES="linux-image-amd64 targetcli-fb python3-rtslib-fb python3-gi dbus open-iscsi sg3-utils lsscsi fio e2fsprogs xfsprogs kmod dmsetup procps iproute2 util-linux coreutils psmisc"
# For the benchmark rows (best effort): tcmu-runner (user:file), dm-writeboost built
# against the guest kernel's headers.
BENCH_PACKAGES="tcmu-runner dm-writeboost-dkms linux-headers-amd64 make gcc"
recipe_hash=$( (cat "$here/build-image.sh" "$here/guest/lc-init"; echo "$PACKAGES $BENCH_PACKAGES") | sha256sum | cut -c1-16)
cache_root=${LC_VM_CACHE:-/var/cache/lc-vm}
out="$cache_root/$recipe_hash"
if [ -f "$out/done" ]; then
    echo "$out"
    exit 0
fi

log() { echo "[build-image $(date +%T)] $*" >&2; }
t0=$(date +%s)
if ! command -v debootstrap >/dev/null || ! command -v mke2fs >/dev/null; then
    log "installing debootstrap, e2fsprogs"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap e2fsprogs >&2
fi

# The Debian mirror this host's apt uses (one-line or deb822 sources).
mirror=$(grep -hE '^deb (\[[^]]*\] )?(https?|file)://' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -E ' (bookworm|stable) ' | awk '{for(i=2;i<=NF;i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' | head -1 || true)
if [ -z "$mirror" ]; then
    mirror=$(awk '/^URIs:/{u=$2} /^Suites:/ && / bookworm( |$)/{print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 || true)
fi
[ -n "$mirror" ] || { echo "build-image: cannot find a Debian bookworm mirror in /etc/apt/sources.list*" >&2; exit 1; }
log "mirror $mirror"

work="$cache_root/build-$recipe_hash"
$SUDO rm -rf "$work"
$SUDO mkdir -p "$work"
root="$work/rootfs"
log "debootstrap (minbase + $PACKAGES)"
$SUDO debootstrap --variant=minbase --include="$(echo $PACKAGES | tr ' ' ',')" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
t1=$(date +%s)
log "debootstrap done in $((t1 - t0)) s"

# Benchmark extras, best effort: the tests do not depend on them.
$SUDO mount -t proc proc "$root/proc"
trap '$SUDO umount "$root/proc" 2>/dev/null || true' EXIT
if $SUDO chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $BENCH_PACKAGES >"$work/bench-packages.log" 2>&1; then
    kv=$(ls "$root/lib/modules" | sort -V | tail -1)
    src=$(ls -d "$root"/usr/src/dm-writeboost-* 2>/dev/null | head -1)
    if [ -n "$src" ] && $SUDO chroot "$root" sh -c "cd /usr/src/$(basename "$src") && make PWD=/usr/src/$(basename "$src") KERNEL_TREE=/usr/src/linux-headers-$kv" >"$work/writeboost.log" 2>&1; then
        ko=$(find "$src" -name 'dm-writeboost.ko' | head -1)
        $SUDO install -D -m 0644 "$ko" "$root/lib/modules/$kv/extra/dm-writeboost.ko"
        $SUDO chroot "$root" depmod "$kv"
        log "dm-writeboost built for $kv"
    else
        log "dm-writeboost not built (see $work/writeboost.log); its benchmark row will be skipped"
    fi
    # tcmu-runner's user:file handler (file_example.c) is built upstream but never
    # installed, so Debian's package lacks it: build it from Debian's source package of
    # the same version and put it beside the packaged handlers.
    if $SUDO chroot "$root" env DEBIAN_FRONTEND=noninteractive MIRROR="$mirror" sh -ec '
        echo "deb-src $MIRROR bookworm main" >/etc/apt/sources.list.d/lc-src.list
        apt-get update -q
        apt-get install -y -q --no-install-recommends dpkg-dev cmake pkg-config libnl-3-dev \
            libnl-genl-3-dev libglib2.0-dev libkmod-dev zlib1g-dev
        rm -rf /usr/src/tcmu-runner-src && mkdir /usr/src/tcmu-runner-src && cd /usr/src/tcmu-runner-src
        apt-get source -q tcmu-runner
        cd "$(find . -mindepth 1 -maxdepth 1 -type d | head -1)" && mkdir -p build && cd build
        cmake .. -Dwith-glfs=false -Dwith-rbd=false -Dwith-qcow=false -Dwith-zbc=false \
            -Dwith-fbo=false -Dwith-tcmalloc=false -DSUPPORT_SYSTEMD=OFF
        make handler_file
        dir=$(dirname "$(find / -xdev -name handler_rbd.so -path "*tcmu-runner*" | head -1)")
        install -m 0644 "$(find . -name handler_file.so | head -1)" "$dir/handler_file.so"
        rm -rf /usr/src/tcmu-runner-src /etc/apt/sources.list.d/lc-src.list
        apt-get update -q' >"$work/tcmu-file.log" 2>&1; then
        log "tcmu-runner user:file handler built"
    else
        log "tcmu-runner user:file handler not built (see $work/tcmu-file.log); its benchmark row will be skipped"
    fi
    # The image must not start tcmu-runner through D-Bus activation behind lc's back.
    $SUDO rm -f "$root/usr/share/dbus-1/system-services/org.kernel.TCMUService1.service"
else
    log "benchmark packages not installed (see $work/bench-packages.log)"
fi
$SUDO umount "$root/proc" || true
trap - EXIT
$SUDO chroot "$root" apt-get clean >/dev/null 2>&1 || true
$SUDO install -m 0755 "$here/guest/lc-init" "$root/sbin/lc-init"
echo "lc-guest" | $SUDO tee "$root/etc/hostname" >/dev/null
# open-iscsi needs an initiator name; targetcli wants /etc/target.
echo "InitiatorName=iqn.2026-11.org.lc:guest" | $SUDO tee "$root/etc/iscsi/initiatorname.iscsi" >/dev/null
$SUDO mkdir -p "$root/etc/target" "$root/payload"

kver=$(ls "$root/lib/modules" | sort -V | tail -1)
$SUDO cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
$SUDO cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
$SUDO chmod 0644 "$work/vmlinuz" "$work/initrd.img"
log "kernel $kver"

size_mb=$(( $($SUDO du -sm "$root" | cut -f1) + 768 ))
# (stdout is this script's answer: the image directory; mke2fs chats there.)
$SUDO mke2fs -q -t ext4 -L lcroot -d "$root" "$work/rootfs.img" "${size_mb}M" >&2
$SUDO rm -rf "$root"
echo "$kver" | $SUDO tee "$work/kernel-version" >/dev/null
$SUDO mv "$work" "$out"
$SUDO touch "$out/done"
log "image ready in $(( $(date +%s) - t0 )) s: $out"
echo "$out"
