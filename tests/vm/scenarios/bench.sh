# The benchmark of issues 4 and 9, in one boot: every device gets the same phases in
# this order (the table of docs/vm-testbed.md): 256 MiB of 1 MiB sequential writes QD4;
# 4 KiB random writes QD32 over 512 MiB; the same with an fsync (SYNCHRONIZE CACHE)
# after every 32 writes: durable random writes; 4 KiB random reads QD32. The guest's
# page cache is dropped before every job. Devices: the raw SSD, the kernel block
# backstore on the throttled HDD, LIO's ramdisk backstore (the ceiling of any LIO
# backstore here), lc (SSD cache + HDD) at two busy-poll settings each followed by an
# lc LUN served from RAM by the same daemon (`backend = "ram"`: the TCMU path's own
# ceiling, no cache engine), tcmu-runner's user:file on the HDD, dm-writecache and
# dm-writeboost on the same two disks behind a LIO `block` backstore (the fair peers:
# they pay the same SCSI/LIO path), and dm-writeboost as a local device (no LIO).
# Prints a table, then ratios. Not part of the default run: tests/vm/run.sh bench
# (LC_BENCH_RUNTIME: seconds per timed job, default 15).
# timeout: 2400
# tcmu-runner's file handler writes through the guest's page cache (no O_DIRECT), so
# its plain writes are cached too; its first SYNCHRONIZE CACHE then has all of them
# to write to the HDD, and TCMU fails it after cmd_time_out (30 s): "failed".
source /payload/scenarios/lib.sh
RT=${LC_BENCH_RUNTIME:-15}
out=/payload/results/bench-table.txt
vals=/tmp/bench-values
: >"$vals"
fmt='%-30s %14s %12s %16s %12s\n'
row() { # name dev key
    local s w f r
    # 256 MiB (or 4 runtimes, whichever ends first) of 1 MiB writes from the start.
    s=$(job "$2" write 1M 4 --size=256M --runtime=$((RT * 4)))
    w=$(timed "$2" randwrite 4k 32)
    f=$(timed "$2" randwrite 4k 32 --fsync=32)
    r=$(timed "$2" randread 4k 32)
    printf "$fmt" "$1" "$s" "$w" "$f" "$r" | tee -a "$out"
    echo "$3 $s $w $f $r" >>"$vals"
}
printf "$fmt" "device" "seqwrite 1M" "randwrite" "randwrite" "randread" | tee "$out"
printf "$fmt" "(IOPS; 4K unless said)" "QD4 256 MiB" "QD32" "QD32 fsync/32" "QD32" | tee -a "$out"
# What the guest's CPU model gives software (TCG: QEMU's model, not the host's).
echo "guest: $(guest_cpu)" | tee -a "$out"
row "raw SSD" /dev/vdb ssd
targetcli /backstores/block create name=hddblk dev=/dev/vdc >/dev/null
loopback_lun /backstores/block/hddblk >/dev/null
row "block backstore (HDD)" "$(lun_dev hddblk)" blk
targetcli clearconfig confirm=True >/dev/null
# LIO's in-kernel ramdisk through the same loopback: no disk at all, so the ceiling of
# any LIO backstore in this guest.
targetcli /backstores/ramdisk create name=r0 size=1G >/dev/null
loopback_lun /backstores/ramdisk/r0 >/dev/null
row "LIO ramdisk (LIO ceiling)" "$(lun_dev r0)" rd
targetcli clearconfig confirm=True >/dev/null
# lc with the default busy poll, and with the one that pays under TCG (docs/CONFIG.md);
# each daemon also serves a RAM LUN (no cache engine): the TCMU path's own ceiling.
for poll in 50 1000; do
    cp /payload/lc.toml /etc/lc/lc.toml
    sed -i "/^\[daemon\]/a busy_poll_us = $poll" /etc/lc/lc.toml
    printf '\n[[lun]]\nname = "ram0"\nbackend = "ram"\nsize = "1GiB"\n' >>/etc/lc/lc.toml
    lc format -y --force /dev/vdb >/dev/null
    start_lc
    targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 hw_max_sectors=2048 >/dev/null
    loopback_lun /backstores/user:lc/disk0 >/dev/null
    k=lc; [ "$poll" = 50 ] || k=lcp
    row "lc, poll ${poll}us$([ "$poll" = 50 ] && echo ' (default)')" "$(lun_dev lc)" "$k"
    lc stats c0 | grep -E "dirty_segments|partial_segments|last_writeback_id" | tee -a "$out"
    targetcli clearconfig confirm=True >/dev/null
    targetcli /backstores/user:lc create name=ram0 size=1G cfgstring=ram0 >/dev/null
    loopback_lun /backstores/user:lc/ram0 >/dev/null
    row "lc RAM LUN, poll ${poll}us" "$(lun_dev lc)" "ram$k"
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
hdd_sectors=$(blockdev --getsz /dev/vdc)
if modprobe dm-writecache 2>/dev/null; then
    fresh_ssd
    lio_row "dm-writecache (LIO block)" wc "0 $hdd_sectors writecache s /dev/vdc /dev/vdb 4096 0" wc
else
    echo "dm-writecache: module not available" | tee -a "$out"
fi
if modprobe dm-writeboost 2>/dev/null; then
    fresh_ssd
    lio_row "dm-writeboost (LIO block)" wb "0 $hdd_sectors writeboost /dev/vdc /dev/vdb" wbl
    fresh_ssd
    dmsetup create wb --table "0 $hdd_sectors writeboost /dev/vdc /dev/vdb"
    dmsetup mknodes
    row "dm-writeboost (local, no LIO)" /dev/mapper/wb wb
    dmsetup remove wb
else
    echo "dm-writeboost: module not available" | tee -a "$out"
fi
echo | tee -a "$out"
python3 - "$vals" <<'PY' | tee -a "$out"
import sys
cols = ["seqwrite 1M", "randwrite", "randwrite fsync/32", "randread"]
v = {}
for line in open(sys.argv[1]):
    k, *xs = line.split()
    v[k] = [int(x) if x.isdigit() else 0 for x in xs]
names = {"lc": "lc poll 50us", "lcp": "lc poll 1000us", "ramlc": "lc RAM LUN poll 50us",
         "ramlcp": "lc RAM LUN poll 1000us", "wc": "dm-writecache (LIO)", "wbl": "dm-writeboost (LIO)",
         "wb": "dm-writeboost (local)", "rd": "LIO ramdisk", "blk": "block backstore (HDD)",
         "ssd": "raw SSD", "file": "tcmu-runner user:file"}
def ratio(a, b, col):
    c = cols.index(col)
    if a in v and b in v and v[a][c] and v[b][c]:
        print(f"{col}: {names[a]} / {names[b]} = {v[a][c] / v[b][c]:.2f}x ({v[a][c]} / {v[b][c]})")
    else:
        print(f"{col}: {names[a]} / {names[b]}: n/a (a row is missing or failed)")
for lc, ram in [("lc", "ramlc"), ("lcp", "ramlcp")]:
    ratio(lc, "wc", "randwrite fsync/32")
    ratio(lc, "wbl", "randwrite")
    ratio(lc, ram, "randwrite")
    ratio(ram, "rd", "randwrite")
    ratio(lc, "wc", "randread")
    ratio(lc, "wc", "seqwrite 1M")
# The lc random reads of the previous bar (docs/vm-testbed.md, 2026-11-29, the old engine).
for k, before in [("lc", 2628), ("lcp", 1295)]:
    if k in v:
        print(f"randread: {names[k]} now {v[k][3]}, previously {before}")
PY
