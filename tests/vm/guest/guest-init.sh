#!/bin/bash
# Runs inside the guest (from /sbin/lc-init): prepares LIO, D-Bus and the disks, runs
# the scenarios listed in /payload/scenarios.list, leaves one .log and one .rc
# ("<exit code> <seconds>") per scenario in /payload/results.
set -u
R=/payload/results
export PATH=/payload/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
# The host's LC_BENCH_*, LC_SUSTAINED_*, ... (run.sh).
[ -f /payload/env ] && . /payload/env
for m in configfs sd_mod sg virtio_blk target_core_mod target_core_user tcm_loop iscsi_target_mod crc32c_generic dm_mod dm_flakey; do
    modprobe "$m" || echo "modprobe $m failed"
done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
ip link set lo up
install -m 0644 /payload/lc-dbus.conf /etc/dbus-1/system.d/lc.conf
mkdir -p /run/dbus /etc/lc
dbus-daemon --system --fork
cp /payload/lc.toml /etc/lc/lc.toml
# Keep the daemon log and the kernel log visible from the host while scenarios run.
( while sleep 5; do cp /tmp/lc.log "$R/lc.log" 2>/dev/null; dmesg >"$R/dmesg.log" 2>/dev/null; done ) &
echo "guest up: $(uname -r), $(nproc) cpus; disks: $(ls /sys/block | tr '\n' ' ')"
for s in $(cat /payload/scenarios.list); do
    echo "=== scenario $s"
    start=$(date +%s)
    # A scenario may ask for more than the default 20 minutes ("# timeout: SECONDS").
    limit=$(sed -n 's/^# timeout: \([0-9][0-9]*\)$/\1/p' "/payload/scenarios/$s.sh" | head -1)
    timeout "${LC_SCENARIO_TIMEOUT:-${limit:-1200}}" bash "/payload/scenarios/$s.sh" >"$R/$s.log" 2>&1
    rc=$?
    echo "$rc $(( $(date +%s) - start ))" >"$R/$s.rc"
    echo "=== scenario $s: rc=$rc"
    if [ "$rc" != 0 ]; then
        cp /tmp/lc.log "$R/$s.lc.log" 2>/dev/null
        dmesg >"$R/$s.dmesg.log" 2>/dev/null
    fi
    sync
done
