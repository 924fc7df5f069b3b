# The benchmark of issue 4, in one boot: the same fio jobs (4 KiB random write QD32,
# the same with an fsync, i.e. SYNCHRONIZE CACHE, after every 32 writes: durable
# random writes; 4 KiB random read QD32; 1 MiB sequential write QD4) against the raw
# SSD, the kernel block backstore on the throttled HDD, LIO's ramdisk backstore (the
# ceiling of any LIO backstore here), lc (SSD cache + HDD) at two busy-poll
# settings, tcmu-runner's user:file on the HDD, and dm-writeboost on the same two
# disks. Prints a table with ratios. Not part of the default run: tests/vm/run.sh bench
# tcmu-runner's file handler writes through the guest's page cache (no O_DIRECT), so
# its plain writes are cached too; its first SYNCHRONIZE CACHE then has all of them
# to write to the HDD, and TCMU fails it after cmd_time_out (30 s): "failed".
source /payload/scenarios/lib.sh
RT=${LC_BENCH_RUNTIME:-15}
out=/payload/results/bench-table.txt
job() { # dev rw bs qd [fio options] -> IOPS, or "failed" (e.g. I/O errors); the other jobs still run
    if fio --name=b --filename="$1" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" --iodepth="$4" "${@:5}" \
        --time_based --runtime="$RT" --size=512M --output-format=json --output=/tmp/job.json >/dev/null 2>&1; then
        python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(int(j["write"]["iops"] + j["read"]["iops"]))' \
            /tmp/job.json || echo failed
    else
        echo failed
    fi
}
row() { # name dev key
    local w r s f
    # The durable random writes run second, on the cache state the plain ones left
    # (before the 1M writes fill lc's and dm-writeboost's caches to the brim).
    w=$(job "$2" randwrite 4k 32); f=$(job "$2" randwrite 4k 32 --fsync=32)
    r=$(job "$2" randread 4k 32); s=$(job "$2" write 1M 4)
    printf '%-22s %12s %12s %14s %14s\n' "$1" "$w" "$r" "$s" "$f" | tee -a "$out"
    eval "W_$3=${w//[!0-9]/} F_$3=${f//[!0-9]/}"
}
printf '%-22s %12s %12s %14s %14s\n' "device" "randwrite" "randread" "seqwrite 1M" "randwrite" | tee "$out"
printf '%-22s %12s %12s %14s %14s\n' "" "4K QD32 IOPS" "4K QD32 IOPS" "QD4 IOPS" "+fsync/32 IOPS" | tee -a "$out"
row "raw SSD" /dev/vdb ssd
targetcli /backstores/block create name=hddblk dev=/dev/vdc >/dev/null
wwn=$(loopback_lun /backstores/block/hddblk)
row "block backstore (HDD)" "$(lun_dev hddblk)" blk
targetcli clearconfig confirm=True >/dev/null
# LIO's in-kernel ramdisk through the same loopback: no disk at all, so the ceiling of
# any LIO backstore in this guest (dm-writeboost does not go through LIO and SCSI).
targetcli /backstores/ramdisk create name=r0 size=1G >/dev/null
loopback_lun /backstores/ramdisk/r0 >/dev/null
row "LIO ramdisk (ceiling)" "$(lun_dev r0)" rd
targetcli clearconfig confirm=True >/dev/null
# lc with the default busy poll, and with the one that pays under TCG (docs/CONFIG.md).
for poll in 50 1000; do
    cp /payload/lc.toml /etc/lc/lc.toml
    sed -i "/^\[daemon\]/a busy_poll_us = $poll" /etc/lc/lc.toml
    lc format -y --force /dev/vdb >/dev/null
    start_lc
    targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 >/dev/null
    loopback_lun /backstores/user:lc/disk0 >/dev/null
    if [ "$poll" = 50 ]; then
        row "lc, poll 50us (default)" "$(lun_dev lc)" lc
    else
        row "lc, poll ${poll}us" "$(lun_dev lc)" lcp
    fi
    lc stats c0 | grep -E "dirty_segments|last_writeback_id" | tee -a "$out"
    targetcli clearconfig confirm=True >/dev/null
    stop_lc
done
cp /payload/lc.toml /etc/lc/lc.toml
if command -v tcmu-runner >/dev/null; then
    tcmu-runner >/tmp/tcmu-runner.log 2>&1 &
    sleep 3
    # (tcmu-runner's file handler opens the path without O_DIRECT: the guest's page
    # cache sits under this row.)
    if err=$(targetcli /backstores/user:file create name=f0 size=1G cfgstring=/dev/vdc 2>&1); then
        loopback_lun /backstores/user:file/f0 >/dev/null
        # tcmu-runner answers INQUIRY with its own product id, not the backstore name.
        row "tcmu-runner user:file" "$(lun_dev TCMU)" file
    else
        echo "tcmu-runner user:file: not available: $err" | tee -a "$out"
    fi
    targetcli clearconfig confirm=True >/dev/null 2>&1 || true
    pkill tcmu-runner || true
else
    echo "tcmu-runner: not installed in the image" | tee -a "$out"
fi
if modprobe dm-writeboost 2>/dev/null; then
    wipefs -a /dev/vdb >/dev/null 2>&1 || true
    dd if=/dev/zero of=/dev/vdb bs=1M count=1 oflag=direct status=none
    dmsetup create wb --table "0 $(blockdev --getsz /dev/vdc) writeboost /dev/vdc /dev/vdb"
    dmsetup mknodes
    row "dm-writeboost" /dev/mapper/wb wb
    dmsetup remove wb
else
    echo "dm-writeboost: module not available" | tee -a "$out"
fi
python3 - "$out" <<PY | tee -a "$out"
cols = {"random write": {"lc": ${W_lc:-0}, "lcp": ${W_lcp:-0}, "file": ${W_file:-0}, "wb": ${W_wb:-0},
                         "blk": ${W_blk:-0}, "ssd": ${W_ssd:-0}, "rd": ${W_rd:-0}},
        "durable random write (fsync/32)": {"lc": ${F_lc:-0}, "lcp": ${F_lcp:-0}, "file": ${F_file:-0},
                         "wb": ${F_wb:-0}, "blk": ${F_blk:-0}, "ssd": ${F_ssd:-0}, "rd": ${F_rd:-0}}}
names = [("file", "tcmu-runner user:file"), ("blk", "block backstore"), ("wb", "dm-writeboost"),
         ("rd", "LIO ramdisk"), ("ssd", "raw SSD")]
for col, vals in cols.items():
    for mine, label in [("lc", "lc, poll 50us"), ("lcp", "lc, poll 1000us")]:
        for k, name in names:
            if vals[mine] and vals[k]:
                print(f"{col} {label} / {name}: {vals[mine] / vals[k]:.2f}x")
PY
