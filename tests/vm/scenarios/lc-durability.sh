# Scenario 4 (first half): fio with verify under load, kill -9 the daemon, restart it
# (the start-up re-attach sequence), verify every block written before the last
# completed flush; repeated.
source /payload/scenarios/lib.sh
lc format -y --force /dev/vdb
start_lc
targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 >/dev/null
loopback_lun /backstores/user:lc/disk0 >/dev/null
dev=$(lun_dev lc)
for round in 1 2; do
    step "round $round: write a verified pattern, fsync (SYNCHRONIZE CACHE)"
    off=$(( (round - 1) * 64 ))
    fio --name=w --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite \
        --offset=${off}M --size=64M --verify=crc32c --do_verify=0 --randrepeat=1 --fsync_on_close=1 \
        --verify_state_save=1 --output-format=terse >/dev/null
    step "more load, then kill -9 the daemon in the middle of it"
    fio --name=noise --filename="$dev" --direct=1 --ioengine=libaio --iodepth=32 --bs=4k --rw=randwrite \
        --offset=512M --size=256M --time_based --runtime=15 --output-format=terse >/dev/null 2>&1 &
    noise=$!
    sleep 3
    pid=$(cat /tmp/lc.pid)
    kill -9 "$pid"
    # Like systemd before a restart, wait until the process is gone: a thread in a
    # long device flush keeps it (and its uio fd) alive until the flush returns.
    t=$(date +%s)
    wait "$pid" 2>/dev/null || true
    step "restart lc (the killed process took $(( $(date +%s) - t )) s to exit)"
    start_lc
    step "wait for the load to end (it may see errors while the daemon was down)"
    wait "$noise" || true
    step "verify the flushed pattern"
    fio --name=w --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite \
        --offset=${off}M --size=64M --verify=crc32c --verify_only=1 --randrepeat=1 --verify_fatal=1 \
        --output-format=terse >/tmp/v.out || { cat /tmp/v.out; fail "round $round: flushed data lost after kill -9"; }
done
echo "lc-durability ok"
