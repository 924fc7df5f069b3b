#!/usr/bin/env bash
# Quick start: on a host with LIO (target_core_user), formats a file-backed demo cache
# and backing device under a state directory, starts the lc daemon, creates a user:lc
# backstore with a loopback LUN and prints its /dev/sdX. On a host without LIO it says
# so and runs the same demo inside the test guest. Run it with sudo: lc is built as the
# user who ran sudo (build-lc.sh), the rest runs as root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
state=${LC_DEMO_DIR:-/var/lib/lc-demo}
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

if ! $SUDO modprobe target_core_user 2>/dev/null || ! $SUDO modprobe tcm_loop 2>/dev/null; then
    echo "This kernel has no LIO/TCMU (modules target_core_user, tcm_loop): running the demo in a QEMU guest."
    LC_VM_RESULTS="$top/target/vm-demo" "$here/run.sh" demo || true
    cat "$top/target/vm-demo/demo.log"
    grep -q "lc disk: /dev/sd" "$top/target/vm-demo/demo.log"
    exit
fi
command -v targetcli >/dev/null || { $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq targetcli-fb python3-rtslib-fb dbus; }
lc=$("$here/build-lc.sh")
$SUDO mkdir -p "$state" /etc/lc /run/lc
[ -f "$state/cache.img" ] || { $SUDO truncate -s 1G "$state/cache.img"; $SUDO "$lc" format -y "$state/cache.img"; }
[ -f "$state/hdd.img" ] || $SUDO truncate -s 4G "$state/hdd.img"
$SUDO tee "$state/lc.toml" >/dev/null <<TOML
[daemon]
control_socket = "/run/lc/control.sock"
[[cache]]
name = "demo"
device = "$state/cache.img"
[[lun]]
name = "demo0"
cache = "demo"
backing = "$state/hdd.img"
backing_id = 0
TOML
$SUDO install -m 0644 "$top/targetcli/lc-dbus.conf" /etc/dbus-1/system.d/lc.conf
$SUDO systemctl reload dbus 2>/dev/null || true
$SUDO sh -c "nohup '$lc' serve --config '$state/lc.toml' >>'$state/lc.log' 2>&1 &"
for _ in $(seq 50); do [ -S /run/lc/control.sock ] && break; sleep 0.2; done
$SUDO targetcli /backstores/user:lc create name=demo0 size=4G cfgstring=demo0 hw_max_sectors=2048

# The /dev/sdX of every SCSI disk that LIO serves from a user:lc backstore (vendor
# LIO-ORG, model lc), from sysfs: no lsscsi needed.
lc_disks() {
    local b vendor model
    for b in /sys/block/*; do
        if [ ! -r "$b/device/vendor" ] || [ ! -r "$b/device/model" ]; then continue; fi
        read -r vendor <"$b/device/vendor" || true
        read -r model <"$b/device/model" || true
        [ "$vendor" = LIO-ORG ] && [ "$model" = lc ] && echo "/dev/${b##*/}"
    done
    return 0
}
before=$(lc_disks)
$SUDO targetcli /loopback create >/dev/null
wwn=""
for w in /sys/kernel/config/target/loopback/naa.*; do [ -d "$w" ] && wwn=${w##*/} && break; done
$SUDO targetcli "/loopback/$wwn/luns" create /backstores/user:lc/demo0 >/dev/null
dev=""
for _ in $(seq 100); do
    for d in $(lc_disks); do
        if ! grep -qxF "$d" <<<"$before" && [ -b "$d" ]; then dev=$d; fi
    done
    [ -n "$dev" ] && break
    sleep 0.2
done
[ -n "$dev" ] || { echo "demo: no new LIO-ORG/lc disk in /sys/block after 20 s" >&2; exit 1; }
echo "lc disk: $dev (daemon log: $state/lc.log; status: sudo $lc status)"
