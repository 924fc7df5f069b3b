# The harness itself, with kernel backstores only: fileio + loopback + fio verify,
# an iSCSI login over 127.0.0.1, dm-flakey.
source /payload/scenarios/lib.sh
step "fileio backstore + loopback LUN"
truncate -s 256M /tmp/f0.img
targetcli /backstores/fileio create name=f0 file_or_dev=/tmp/f0.img size=256M >/dev/null
loopback_lun /backstores/fileio/f0 >/dev/null
dev=$(lun_dev f0)
echo "fileio LUN is $dev"
fio_verify "$dev" 32M
step "iSCSI on 127.0.0.1:3260"
iqn=iqn.2026-11.org.lc:selftest
targetcli /iscsi create "$iqn" >/dev/null
targetcli "/iscsi/$iqn/tpg1/luns" create /backstores/fileio/f0 >/dev/null
targetcli "/iscsi/$iqn/tpg1" set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1 >/dev/null
targetcli "/iscsi/$iqn/tpg1/portals" delete 0.0.0.0 3260 >/dev/null 2>&1 || true
targetcli "/iscsi/$iqn/tpg1/portals" create 127.0.0.1 3260 >/dev/null
mkdir -p /run/lock/iscsi /var/lib/iscsi
iscsid
sleep 1
iscsiadm -m discovery -t sendtargets -p 127.0.0.1 | grep -q "$iqn" || fail "discovery"
iscsiadm -m node -T "$iqn" -p 127.0.0.1 --login
sleep 2
n=$(lsscsi | awk '$3 == "LIO-ORG" && $4 == "f0"' | wc -l)
[ "$n" -ge 2 ] || { lsscsi; fail "iSCSI disk not seen"; }
iscsiadm -m node -T "$iqn" -p 127.0.0.1 --logout
step "dm-flakey"
sz=$(blockdev --getsz /dev/vdc)
dmsetup create flaky --table "0 $sz flakey /dev/vdc 0 5 1"
dmsetup mknodes
[ -b /dev/mapper/flaky ] || fail "dm-flakey node"
dmsetup remove flaky
echo "selftest ok"
