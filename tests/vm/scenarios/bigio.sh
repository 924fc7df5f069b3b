# The benchmark of issue 10 (large I/O, reads of cached data, read caching), in one
# boot. Every device sits behind the same LIO loopback path; the guest's page cache is
# dropped before every job. Phases, in this order on each device:
#   seqwrite  256 MiB of 1 MiB sequential writes QD4 from offset 0 on a fresh cache;
#   seqread   the same 256 MiB read back, 1 MiB QD4 (cached data);
#   randread  4 KiB random reads QD32 over those 256 MiB (cached data);
#   miss 1/2  two passes of 4 KiB random reads QD32 over 16 MiB at offset 768 MiB that
#             were written straight to the backing device before the cache started
#             (read misses: pass 2 shows what the cache kept of pass 1).
# Devices: LIO's ramdisk (the ceiling of any LIO backstore here); lc created the way the
# README says (hw_max_sectors=2048) and, for comparison, with LIO's default (128); lc with
# o_direct = true; dm-writecache and dm-writeboost (read_cache_threshold 1) behind a LIO
# `block` backstore on the same two disks. Prints a table, then ratios (bigio-table.txt
# in the results). Not part of the default run: tests/vm/run.sh bigio
# (LC_BENCH_RUNTIME: seconds per timed job, default 15).
# timeout: 2400
source /payload/scenarios/lib.sh
RT=${LC_BENCH_RUNTIME:-15}
out=/payload/results/bigio-table.txt
vals=/tmp/bigio-values
: >"$vals"
MISS_OFF=$((768 << 20))
# 16 MiB of known data straight onto the HDD, where every device will look for it.
seed_misses() {
    dd if=/dev/urandom of=/dev/vdc bs=1M count=16 seek=$((MISS_OFF >> 20)) oflag=direct status=none
}
fmt='%-34s %9s %9s %9s %9s %9s\n'
row() { # name dev key
    local s r q m1 m2
    s=$(job "$2" write 1M 4 --size=256M --runtime=$((RT * 4)))
    r=$(job "$2" read 1M 4 --size=256M --runtime=$((RT * 4)))
    q=$(job "$2" randread 4k 32 --size=256M --time_based --runtime="$RT")
    m1=$(job "$2" randread 4k 32 --offset="$MISS_OFF" --size=16M --time_based --runtime="$RT")
    m2=$(job "$2" randread 4k 32 --offset="$MISS_OFF" --size=16M --time_based --runtime="$RT")
    printf "$fmt" "$1" "$s" "$r" "$q" "$m1" "$m2" | tee -a "$out"
    echo "$3 $s $r $q $m1 $m2" >>"$vals"
}
printf "$fmt" "device (IOPS)" "seqwrite" "seqread" "randread" "miss 1" "miss 2" | tee "$out"
printf "$fmt" "" "1M QD4" "1M QD4" "4K QD32" "4K QD32" "4K QD32" | tee -a "$out"
targetcli /backstores/ramdisk create name=r0 size=1G >/dev/null
loopback_lun /backstores/ramdisk/r0 >/dev/null
row "LIO ramdisk (LIO ceiling)" "$(lun_dev r0)" rd
targetcli clearconfig confirm=True >/dev/null
lc_row() { # name key hw_max_sectors [[cache] line] [[daemon] line]
    cp /payload/lc.toml /etc/lc/lc.toml
    [ -n "${4:-}" ] && sed -i "/^device = /a $4" /etc/lc/lc.toml
    [ -n "${5:-}" ] && sed -i "/^\[daemon\]/a $5" /etc/lc/lc.toml
    lc format -y --force /dev/vdb >/dev/null
    seed_misses
    start_lc
    targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 \
        ${3:+hw_max_sectors=$3} >/dev/null
    loopback_lun /backstores/user:lc/disk0 >/dev/null
    local d; d=$(lun_dev lc)
    echo "$1: max_sectors_kb $(cat /sys/block/${d#/dev/}/queue/max_sectors_kb)" >>/tmp/bigio-notes
    row "$1" "$d" "$2"
    lc stats c0 | grep -E "read_|hits|misses" >>/tmp/bigio-notes || true
    targetcli clearconfig confirm=True >/dev/null
    stop_lc
}
: >/tmp/bigio-notes
lc_row "lc (README: hw_max_sectors=2048)" lc 2048
lc_row "lc, LIO default hw_max_sectors" lc128 ""
lc_row "lc, hw_max_sectors=2048, o_direct" lcd 2048 "o_direct = true"
# More I/O workers per device: reads of the cache device in flight (issue 10).
for t in ${LC_BENCH_IO_THREADS:-}; do
    lc_row "lc, o_direct, io_threads=$t" "lcd$t" 2048 "o_direct = true" "io_threads = $t"
done
cp /payload/lc.toml /etc/lc/lc.toml
hdd_sectors=$(blockdev --getsz /dev/vdc)
if modprobe dm-writecache 2>/dev/null; then
    fresh_ssd
    seed_misses
    lio_row "dm-writecache (LIO block)" wc "0 $hdd_sectors writecache s /dev/vdc /dev/vdb 4096 0" wc
else
    echo "dm-writecache: module not available" | tee -a "$out"
fi
if modprobe dm-writeboost 2>/dev/null; then
    fresh_ssd
    seed_misses
    lio_row "dm-writeboost rct=1 (LIO block)" wb \
        "0 $hdd_sectors writeboost /dev/vdc /dev/vdb 2 read_cache_threshold 1" wb
else
    echo "dm-writeboost: module not available" | tee -a "$out"
fi
echo | tee -a "$out"
cat /tmp/bigio-notes | tee -a "$out"
echo | tee -a "$out"
python3 - "$vals" <<'PY' | tee -a "$out"
import sys
cols = ["seqwrite", "seqread", "randread", "miss 1", "miss 2"]
v = {}
for line in open(sys.argv[1]):
    k, *xs = line.split()
    v[k] = [int(x) if x.isdigit() else 0 for x in xs]
names = {"lc": "lc (hw_max_sectors=2048)", "lc128": "lc (hw_max_sectors=128)",
         "lcd": "lc (o_direct)", "rd": "LIO ramdisk", "wc": "dm-writecache (LIO)",
         "wb": "dm-writeboost rct=1 (LIO)"}
def ratio(a, ca, b, cb):
    ia, ib = cols.index(ca), cols.index(cb)
    if a in v and b in v and v[a][ia] and v[b][ib]:
        print(f"{names[a]} {ca} / {names[b]} {cb} = {v[a][ia] / v[b][ib]:.2f}x ({v[a][ia]} / {v[b][ib]})")
    else:
        print(f"{names[a]} {ca} / {names[b]} {cb}: n/a (a row is missing or failed)")
for lc in ["lc", "lcd"]:
    ratio(lc, "seqwrite", "wc", "seqwrite")    # target >= 1.0
    ratio(lc, "seqwrite", "rd", "seqwrite")    # target >= 0.8
    ratio(lc, "seqread", "rd", "seqread")      # target >= 0.8
    ratio(lc, "randread", "wc", "randread")    # target >= 1.0
    ratio(lc, "miss 2", lc, "miss 1")          # read caching: target >= 10
    ratio(lc, "miss 2", "wc", "randread")      # read caching: target >= 0.8
ratio("lc", "seqwrite", "lc128", "seqwrite")
ratio("wb", "miss 2", "wb", "miss 1")
PY
