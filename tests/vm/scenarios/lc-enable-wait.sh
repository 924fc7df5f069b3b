# timeout: 300
# Issue 11: an `enable` that waits for a daemon when lc starts. lc turns the kernel's
# netlink reply feature on at start and off at a clean stop; killed with kill -9, it
# leaves it on, and the next `echo 1 > enable` of a user: backstore (what targetctl
# restore and targetcli do) blocks in the kernel waiting for ADDED_DEVICE_DONE. The
# next lc must answer that write with the device's id (configfs
# statistics/scsi_dev/indx) so it succeeds and the LUN serves, refuse a waiting device
# it cannot serve so that write fails, and leave nothing in D state.
source /payload/scenarios/lib.sh
core=/sys/kernel/config/target/core
lc format -y --force /dev/vdb
truncate -s 64M /tmp/enable-b1.img
cat >/etc/lc/lc.toml <<TOML
[daemon]
control_socket = "/run/lc/control.sock"
[[cache]]
name = "c0"
device = "/dev/vdb"
[[lun]]
name = "disk0"
cache = "c0"
backing = "/dev/vdc"
backing_id = 0
[[lun]]
name = "disk1"
cache = "c0"
backing = "/tmp/enable-b1.img"
backing_id = 1
TOML

# Creates user_<hba>/<name> with dev_config lc/<cfg> and starts `echo 1 > enable` in
# the background; its exit status lands in /tmp/enable-<name>.rc.
pending_enable() {
    local hba=$1 name=$2 cfg=$3 size=$4 d
    d=$core/user_$hba/$name
    mkdir -p "$d"
    echo -n "dev_config=lc/$cfg" >"$d/control"
    echo -n "dev_size=$size" >"$d/control"
    rm -f "/tmp/enable-$name.rc"
    ( set +e; echo 1 >"$d/enable"; echo $? >"/tmp/enable-$name.rc" ) 2>/dev/null &
}
# If lc failed to answer, the writers would stay in D state for good and the guest
# could not power off: unstick them the way an admin would, then fail.
unstick() {
    echo 1 >/sys/module/target_core_user/parameters/block_netlink
    echo 1 >/sys/module/target_core_user/parameters/reset_netlink
    echo 0 >/sys/module/target_core_user/parameters/block_netlink
    fail "$*"
}

start_lc
step "disk0: a LUN with 16 MiB written and flushed"
targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 >/dev/null
wwn=$(loopback_lun /backstores/user:lc/disk0)
dev0=$(lun_dev lc)
head -c 16M /dev/urandom >/tmp/enable-data
dd if=/tmp/enable-data of="$dev0" bs=1M oflag=direct conv=fsync status=none || fail "write disk0"
sha=$(sha256sum </tmp/enable-data | cut -d' ' -f1)

step "kill -9 lc: the kernel's reply feature stays on"
pid=$(cat /tmp/lc.pid)
kill -9 "$pid"
wait "$pid" 2>/dev/null || true

step "enable disk1 (lc/disk1) and bogus (lc/nosuchlun) with no daemon: both writes wait"
pending_enable 90 disk1 disk1 $((64 << 20))
pending_enable 91 bogus nosuchlun $((64 << 20))
sleep 3
for n in disk1 bogus; do
    [ -f "/tmp/enable-$n.rc" ] && fail "enable of $n returned ($(cat "/tmp/enable-$n.rc")) with no daemon: the reply feature was off?"
done
[ "$(cat $core/user_90/disk1/enable)" = 0 ] || unstick "disk1 enable does not read 0 while it waits"
idx=$(cat $core/user_90/disk1/statistics/scsi_dev/indx) || unstick "statistics/scsi_dev/indx unreadable while enable waits"
echo "disk1 waits: dev_index $idx, uio $(grep -l "tcm-user/90/disk1/" /sys/class/uio/uio*/name)"
ps -eo stat=,pid=,args= | awk '$1 ~ /^D/' | tee /tmp/enable-dstate.before
[ -s /tmp/enable-dstate.before ] || unstick "the waiting writers are not in D state (is the wait what we think?)"

step "start lc: disk1's enable succeeds, bogus's fails, within a few seconds"
t0=$(date +%s%N)
start_lc
for _ in $(seq 100); do
    [ -f /tmp/enable-disk1.rc ] && [ -f /tmp/enable-bogus.rc ] && break
    sleep 0.1
done
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ -f /tmp/enable-disk1.rc ] || unstick "enable of disk1 still waiting ${ms} ms after lc started"
[ -f /tmp/enable-bogus.rc ] || unstick "enable of bogus still waiting ${ms} ms after lc started"
echo "both enables returned ${ms} ms after lc was started: disk1 rc $(cat /tmp/enable-disk1.rc), bogus rc $(cat /tmp/enable-bogus.rc)"
[ "$(cat /tmp/enable-disk1.rc)" = 0 ] || fail "enable of disk1 failed"
[ "$(cat /tmp/enable-bogus.rc)" != 0 ] || fail "enable of a device lc cannot serve succeeded"
[ "$(cat $core/user_90/disk1/enable)" = 1 ] || fail "disk1 enable does not read 1"
[ "$(cat $core/user_91/bogus/enable)" = 0 ] || fail "bogus enabled"
grep "answered an enable that was waiting" /tmp/lc.log || fail "lc did not log the answered enables"
lc status
lc status --json | python3 -c 'import json, sys
luns = {l["name"]: l for l in json.load(sys.stdin)["luns"]}
sys.exit(0 if (luns["disk1"]["served_by"] or "").startswith("uio") else 1)' || fail "disk1 not served"

step "disk0's flushed data reads back; disk1 serves reads and writes"
got=$(dd if="$dev0" bs=1M count=16 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[ "$got" = "$sha" ] || fail "disk0 data differs after the restart"
add_lun "$wwn" /backstores/user:lc/disk1 || fail "LUN on disk1"
dev1=$(lun_dev lc "$dev0")
fio_verify "$dev1" 16M
fio_verify "$dev0" 8M

step "nothing in D state"
sleep 1
ps -eo stat=,pid=,args= | awk '$1 ~ /^D/' | tee /tmp/enable-dstate.after
[ -s /tmp/enable-dstate.after ] && fail "processes in D state"
rmdir $core/user_91/bogus $core/user_91 || fail "rmdir of the refused device"
stop_lc
echo "lc-enable-wait ok"
