#!/usr/bin/env bash
# Quick start: on a host with LIO (target_core_user), formats a file-backed demo cache
# and backing device under a state directory, starts the lc daemon, creates a user:lc
# backstore with a loopback LUN and prints its /dev/sdX. On a host without LIO it says
# so and runs the same demo inside the test guest.
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
for p in targetcli; do
    command -v $p >/dev/null || { $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq targetcli-fb python3-rtslib-fb dbus; }
done
(cd "$top" && cargo build --release --quiet --bin lc)
lc="$top/target/release/lc"
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
$SUDO targetcli /backstores/user:lc create name=demo0 size=4G cfgstring=demo0
$SUDO targetcli /loopback create >/dev/null
wwn=$(ls /sys/kernel/config/target/loopback | grep naa | head -1)
$SUDO targetcli "/loopback/$wwn/luns" create /backstores/user:lc/demo0 >/dev/null
sleep 2
dev=$(lsscsi | awk '$3 == "LIO-ORG" && $4 == "lc" {print $NF}' | tail -1)
echo "lc disk: $dev (daemon log: $state/lc.log; status: sudo $lc status)"
