# Scenario 4, second half (boot 1 of 2): a verified pattern made durable with a
# flush, more load, then the guest is powered off hard (sysrq b: no sync, no
# unmount); run.sh boots again on the same disk images for lc-powercut-2.
source /payload/scenarios/lib.sh
lc format -y --force /dev/vdb
start_lc
targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 >/dev/null
loopback_lun /backstores/user:lc/disk0 >/dev/null
dev=$(lun_dev lc)
step "durable pattern (fsync = SYNCHRONIZE CACHE)"
fio --name=pc --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite \
    --size=96M --verify=crc32c --do_verify=0 --randrepeat=1 --fsync_on_close=1 --output-format=terse >/dev/null
echo "pattern written and flushed" >/payload/results/lc-powercut.flushed
sync
step "load, then a hard power cut"
fio --name=noise --filename="$dev" --direct=1 --ioengine=libaio --iodepth=32 --bs=4k --rw=randwrite \
    --offset=512M --size=256M --time_based --runtime=60 --output-format=terse >/dev/null 2>&1 &
sleep 5
echo "0 0" >/payload/results/lc-powercut.rc
sync
echo b >/proc/sysrq-trigger
sleep 30
fail "still running after the power cut"
