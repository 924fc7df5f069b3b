# Scenarios 1-3: targetcli lists user:lc (D-Bus), creates a backstore with a good
# cfgstring and refuses a bad one with the daemon's message; a loopback /dev/sdX with
# the right INQUIRY, capacity, WCE and DPOFUA; fio verify; ext4 and xfs round trips;
# live reconfiguration (dev_size, emulate_write_cache); the same backstore over iSCSI
# on 127.0.0.1 with fio verify.
source /payload/scenarios/lib.sh
step "format the cache, start lc"
lc format -y --force /dev/vdb
start_lc
step "targetcli sees user:lc"
targetcli ls /backstores | tee /tmp/ls.txt
grep -q "user:lc" /tmp/ls.txt || fail "targetcli does not list user:lc"
step "bad cfgstring refused with the daemon's message"
if targetcli /backstores/user:lc create name=bad size=1G cfgstring=nope >/tmp/bad.txt 2>&1; then
    cat /tmp/bad.txt; fail "bad cfgstring accepted"
fi
cat /tmp/bad.txt
grep -q "no lun" /tmp/bad.txt || fail "targetcli did not show CheckConfig's message"
step "local users: CheckConfig and the control socket are root's"
mode=$(stat -c %a /run/lc/control.sock)
[ "$mode" = 600 ] || fail "control socket has mode $mode"
nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
if nobody dbus-send --system --print-reply --dest=org.kernel.TCMUService1 /org/kernel/TCMUService1/lc \
    org.kernel.TCMUService1.CheckConfig string:lc/disk0 >/tmp/nobody.txt 2>&1; then
    cat /tmp/nobody.txt; fail "a non-root user called CheckConfig"
fi
cat /tmp/nobody.txt
# The image has tcmu-runner's policy too (it allows the call), so either the bus or
# the daemon refuses, depending on the order dbus-daemon read the two files.
grep -q AccessDenied /tmp/nobody.txt || fail "CheckConfig from a non-root user not refused with AccessDenied"
nobody dbus-send --system --print-reply --dest=org.kernel.TCMUService1 /org/kernel/TCMUService1 \
    org.freedesktop.DBus.ObjectManager.GetManagedObjects | grep -q /org/kernel/TCMUService1/lc \
    || fail "a non-root user cannot list the handler"
if nobody "$(command -v lc)" status >/tmp/nobody.txt 2>&1; then cat /tmp/nobody.txt; fail "a non-root user used the control socket"; fi
cat /tmp/nobody.txt
grep -q "cannot reach the lc daemon.*Permission denied" /tmp/nobody.txt || fail "lc status as a non-root user did not fail on the socket's mode"
step "create disk0"
targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0
lc status
step "loopback LUN"
loopback_lun /backstores/user:lc/disk0 >/dev/null
dev=$(lun_dev lc)
echo "lc LUN is $dev"
sg_inq "$dev" | tee /tmp/inq.txt
grep -q "LIO-ORG" /tmp/inq.txt || fail "vendor"
sg_readcap --16 "$dev" | tee /tmp/cap.txt
grep -q "Logical block length=512" /tmp/cap.txt || fail "block size"
grep -q "Device size: 1073741824 bytes" /tmp/cap.txt || fail "size"
sg_modes --page=8 "$dev" | tee /tmp/modes.txt
grep -qi "dpofua=1" /tmp/modes.txt || fail "DPOFUA"
[ "$(cat /sys/block/$(basename "$dev")/queue/write_cache)" = "write back" ] || fail "kernel does not see a write-back cache (WCE=1)"
step "live reconfiguration (RECONFIG events): grow, refuse beyond the backing device, write cache off and on, shrink back"
so=/backstores/user:lc/disk0
sd=$(basename "$dev")
rescan() { echo 1 >"/sys/block/$sd/device/rescan"; }
targetcli $so set attribute dev_size=1610612736 || fail "growing disk0 to 1.5 GiB refused"
sg_turs -v "$dev" >/tmp/tur.txt 2>&1 || true
cat /tmp/tur.txt
grep -qi "capacity data has changed" /tmp/tur.txt || dmesg | grep -qi "capacity data has changed" \
    || fail "no UNIT ATTENTION / CAPACITY DATA HAS CHANGED after the resize"
rescan
[ "$(blockdev --getsize64 "$dev")" = 1610612736 ] || fail "the initiator does not see 1.5 GiB after a rescan"
if targetcli $so set attribute dev_size=4294967296 >/tmp/big.txt 2>&1; then
    cat /tmp/big.txt; fail "a size beyond the 2 GiB backing device was accepted"
fi
[ "$(cat /sys/kernel/config/target/core/user_*/disk0/attrib/dev_size)" = 1610612736 ] || fail "refused size was stored"
grep -q "exceeds the backing device" /tmp/lc.log || fail "the daemon did not say why it refused the size"
targetcli $so set attribute emulate_write_cache=0 || fail "write cache off refused"
rescan
[ "$(cat /sys/block/$sd/queue/write_cache)" = "write through" ] || fail "WCE still set after emulate_write_cache=0"
targetcli $so set attribute emulate_write_cache=1 || fail "write cache on refused"
targetcli $so set attribute dev_size=1073741824 || fail "shrinking back to 1 GiB refused"
sg_turs "$dev" >/dev/null 2>&1 || true
rescan
[ "$(cat /sys/block/$sd/queue/write_cache)" = "write back" ] || fail "WCE not back after emulate_write_cache=1"
[ "$(blockdev --getsize64 "$dev")" = 1073741824 ] || fail "the initiator does not see 1 GiB again"
step "fio randwrite + verify"
fio_verify "$dev" 64M
step "ext4 round trip"
mkfs.ext4 -q -F "$dev"
mkdir -p /mnt/t
mount "$dev" /mnt/t
for i in $(seq 1 40); do mkdir -p /mnt/t/d$((i % 5)); head -c $((i * 7919)) /dev/urandom >/mnt/t/d$((i % 5))/f$i; done
(cd /mnt/t && find . -type f -exec sha256sum {} + | sort -k2) >/tmp/sums
umount /mnt/t
fsck.ext4 -f -n "$dev" || fail "fsck.ext4"
mount "$dev" /mnt/t
(cd /mnt/t && sha256sum -c --quiet /tmp/sums) || fail "ext4 checksums"
umount /mnt/t
step "xfs round trip"
mkfs.xfs -q -f "$dev"
mount "$dev" /mnt/t
cp -r /payload/scenarios /mnt/t/s
(cd /mnt/t && find . -type f -exec sha256sum {} + | sort -k2) >/tmp/sums
umount /mnt/t
xfs_repair -n "$dev" || fail "xfs_repair"
mount "$dev" /mnt/t
(cd /mnt/t && sha256sum -c --quiet /tmp/sums) || fail "xfs checksums"
umount /mnt/t
step "iSCSI"
iqn=iqn.2026-11.org.lc:disk0
targetcli /iscsi create "$iqn" >/dev/null
targetcli "/iscsi/$iqn/tpg1/luns" create /backstores/user:lc/disk0 >/dev/null
targetcli "/iscsi/$iqn/tpg1" set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1 >/dev/null
targetcli "/iscsi/$iqn/tpg1/portals" delete 0.0.0.0 3260 >/dev/null 2>&1 || true
targetcli "/iscsi/$iqn/tpg1/portals" create 127.0.0.1 3260 >/dev/null
mkdir -p /run/lock/iscsi
pgrep iscsid >/dev/null || iscsid
sleep 1
iscsiadm -m discovery -t sendtargets -p 127.0.0.1 >/dev/null
iscsiadm -m node -T "$iqn" -p 127.0.0.1 --login
sleep 2
idev=$(lsscsi -t | awk '/iqn.2026-11.org.lc:disk0/ {print $NF}' | head -1)
[ -b "$idev" ] || { lsscsi -t; fail "iSCSI disk not found"; }
fio_verify "$idev" 32M randwrite
iscsiadm -m node -T "$iqn" -p 127.0.0.1 --logout
lc stats c0
echo "lc-basic ok"
