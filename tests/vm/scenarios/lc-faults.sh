# Scenario 6: backing-device errors (dm-error swapped under the backing device)
# reach the initiator as MEDIUM ERROR, the daemon keeps serving another LUN, and
# nothing acknowledged is lost once the fault clears.
source /payload/scenarios/lib.sh
lc format -y --force /dev/vdb
half=$(split_disk /dev/vdc hddA hddB)
cat >/etc/lc/lc.toml <<TOML
[daemon]
control_socket = "/run/lc/control.sock"
[[cache]]
name = "c0"
device = "/dev/vdb"
o_direct = true    # reads must reach the failing device, not the page cache
[[lun]]
name = "disk0"
cache = "c0"
backing = "/dev/mapper/hddA"
backing_id = 0
[[lun]]
name = "disk1"
cache = "c0"
backing = "/dev/mapper/hddB"
backing_id = 1
TOML
start_lc
targetcli /backstores/user:lc create name=disk0 size=512M cfgstring=disk0 >/dev/null
targetcli /backstores/user:lc create name=disk1 size=512M cfgstring=disk1 >/dev/null
wwn=$(loopback_lun /backstores/user:lc/disk0)
add_lun "$wwn" /backstores/user:lc/disk1
sleep 2
d0=$(lsscsi | awk '$3 == "LIO-ORG" && $4 == "lc" {print $NF}' | sed -n 1p)
d1=$(lsscsi | awk '$3 == "LIO-ORG" && $4 == "lc" {print $NF}' | sed -n 2p)
[ -b "$d0" ] && [ -b "$d1" ] || { lsscsi; fail "two lc LUNs expected"; }
# Which one is disk0: the serial (VPD 0x80) is the backstore's, so ask the daemon.
step "old data on disk0, written back to its backing device"
head -c 8M /dev/urandom >/tmp/old
dd if=/tmp/old of="$d0" bs=1M oflag=direct conv=fsync status=none
dd if=/tmp/old of="$d1" bs=1M oflag=direct conv=fsync status=none
lc drain disk0
lc drain disk1
step "backing device of disk0 fails"
retable hddA "0 $half error"
failed_dev=""
for d in "$d0" "$d1"; do
    if ! sg_raw -r 4096 "$d" 28 00 00 00 00 00 00 00 08 00 >/tmp/raw.$$ 2>&1; then
        failed_dev=$d
        cat /tmp/raw.$$
        grep -qi "medium error" /tmp/raw.$$ || fail "read error is not a MEDIUM ERROR"
    fi
done
[ -n "$failed_dev" ] || fail "no read failed while the backing device was failing"
good_dev=$d0; [ "$failed_dev" = "$d0" ] && good_dev=$d1
step "the other LUN keeps serving"
fio_verify "$good_dev" 16M
step "writes to the failing LUN are still accepted into the cache"
head -c 4M /dev/urandom >/tmp/new
dd if=/tmp/new of="$failed_dev" bs=1M seek=16 oflag=direct conv=fsync status=none
lc status
step "fault clears: nothing acknowledged was lost"
retable hddA "0 $half linear /dev/vdc 0"
cmp <(dd if="$failed_dev" bs=1M count=8 iflag=direct status=none) /tmp/old || fail "old data changed"
cmp <(dd if="$failed_dev" bs=1M skip=16 count=4 iflag=direct status=none) /tmp/new || fail "acknowledged new data lost"
lc drain disk0
lc drain disk1
echo "lc-faults ok"
