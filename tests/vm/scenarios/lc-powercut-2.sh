# Scenario 4, second half (boot 2 of 2): after the hard power-off, the daemon replays
# the log and every block of the flushed pattern reads back.
source /payload/scenarios/lib.sh
[ -f /payload/results/lc-powercut.flushed ] || fail "boot 1 did not reach its flush"
start_lc
grep -E "cache opened" /tmp/lc.log
targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 >/dev/null
loopback_lun /backstores/user:lc/disk0 >/dev/null
dev=$(lun_dev lc)
fio --name=pc --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite \
    --size=96M --verify=crc32c --verify_only=1 --randrepeat=1 --verify_fatal=1 --output-format=terse >/tmp/v.out \
    || { cat /tmp/v.out; fail "flushed data lost across a hard power-off"; }
lc check --json /dev/vdb >/dev/null 2>&1 || true
echo "lc-powercut-2 ok"
