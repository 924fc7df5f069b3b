# Sustained random writes (issue 9): from a fresh 1 GiB cache, 4 KiB random writes QD32
# over 512 MiB (half the cache) for LC_SUSTAINED_RUNTIME seconds (default 120), IOPS
# per 10 s interval; once with an fsync (SYNCHRONIZE CACHE) every 32 writes and once
# without; for lc and for dm-writecache behind a LIO `block` backstore on the same two
# disks (SSD cache, throttled HDD), in this one boot. Prints the intervals side by side,
# each run's min/first ratio and the per-interval lc/dm-writecache ratio, and after
# each lc run its appends (count; microseconds holding the engine lock, writing,
# flushing), its segment counts and the cleaner's (lines live, stale, moved, written
# back; last_flushed_id over nr_segments is how often the log lapped: below 1 the
# cleaner never ran). The table goes to sustained-table.txt in the results. Not part
# of the default run:
# tests/vm/run.sh sustained
# timeout: 2400
source /payload/scenarios/lib.sh
RT=${LC_SUSTAINED_RUNTIME:-120}
POLL=${LC_SUSTAINED_POLL:-}
out=/payload/results/sustained-table.txt
: >"$out"
# Every device in the comparison gets a 1 GiB cache: the whole SSD when it is that
# size, else its first GiB (dm-linear).
ssd=/dev/vdb
if [ "$(blockdev --getsize64 /dev/vdb)" -gt $((1 << 30)) ]; then
    dmsetup create ssd1g --table "0 $(((1 << 30) / 512)) linear /dev/vdb 0"
    dmsetup mknodes
    ssd=/dev/mapper/ssd1g
fi
[ "$(blockdev --getsize64 "$ssd")" -eq $((1 << 30)) ] || fail "cache device $ssd is not 1 GiB"
echo "cache device $ssd (1 GiB), origin /dev/vdc; ${RT} s per run, 4 KiB random writes QD32 over 512 MiB" | tee -a "$out"

run() { # dev tag [fio options]: per-interval write IOPS into /tmp/sus-<tag>
    sync
    echo 3 >/proc/sys/vm/drop_caches
    rm -f /tmp/sus_"$2"_iops.*.log
    fio --name=s --filename="$1" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=32 \
        --size=512M --time_based --runtime=$((RT + 2)) "${@:3}" \
        --write_iops_log="/tmp/sus_$2" --log_avg_msec=10000 --output-format=json --output="/tmp/sus-$2.json" \
        >/dev/null 2>&1 || { cat "/tmp/sus-$2.json" >&2; fail "fio $2 on $1"; }
    # "msec, IOPS over the 10 s ending there, direction, bs, prio". fio logs a window
    # only once the job runs past its end, hence the 2 s more; the partial last window
    # is left out.
    awk -F, -v n=$((RT / 10)) '$3 + 0 == 1 && k < n {k++; printf "%d %d\n", $1, $2}' \
        /tmp/sus_"$2"_iops.*.log >"/tmp/sus-$2"
    echo "$2: $(awk '{printf "%s ", $2}' "/tmp/sus-$2")" | tee -a "$out"
}

# lc, a fresh cache before each run.
for mode in fsync plain; do
    cp /payload/lc.toml /etc/lc/lc.toml
    sed -i "s|^device = \"/dev/vdb\"|device = \"$ssd\"|" /etc/lc/lc.toml
    [ -n "$POLL" ] && sed -i "/^\[daemon\]/a busy_poll_us = $POLL" /etc/lc/lc.toml
    lc format -y --force "$ssd" >/dev/null
    start_lc
    targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 hw_max_sectors=2048 >/dev/null
    loopback_lun /backstores/user:lc/disk0 >/dev/null
    opt=(); [ "$mode" = fsync ] && opt=(--fsync=32)
    run "$(lun_dev lc)" "lc-$mode" "${opt[@]}"
    lc stats c0 | grep -E "nr_segments|appends|append_write_us|append_flush_us|append_locked_us|dirty_segments|partial_segments|last_writeback_id|last_flushed_id|live_lines|stale_lines|moved_lines|cleaner_bytes_read|written_back_lines" \
        | sed "s/^/  lc-$mode after: /" | tee -a "$out"
    targetcli clearconfig confirm=True >/dev/null
    stop_lc
done
cp /payload/lc.toml /etc/lc/lc.toml

# dm-writecache behind a LIO block backstore, a fresh cache before each run.
modprobe dm-writecache || fail "no dm-writecache module in the guest kernel"
hdd_sectors=$(blockdev --getsz /dev/vdc)
for mode in fsync plain; do
    fresh_ssd "$ssd"
    dmsetup create wc --table "0 $hdd_sectors writecache s /dev/vdc $ssd 4096 0"
    dmsetup mknodes
    targetcli /backstores/block create name=wcblk dev=/dev/mapper/wc >/dev/null
    loopback_lun /backstores/block/wcblk >/dev/null
    opt=(); [ "$mode" = fsync ] && opt=(--fsync=32)
    run "$(lun_dev wcblk)" "wc-$mode" "${opt[@]}"
    echo "  wc-$mode after: dmsetup status: $(dmsetup status wc)" | tee -a "$out"
    targetcli clearconfig confirm=True >/dev/null
    # (A suspend drains only the writeback already under way: no flush_on_suspend.)
    dmsetup remove wc
done

echo | tee -a "$out"
python3 - <<'PY' | tee -a "$out"
def load(tag):
    return [int(line.split()[1]) for line in open(f"/tmp/sus-{tag}")]
for mode, label in [("fsync", "fsync every 32 writes"), ("plain", "no fsync")]:
    lc, wc = load(f"lc-{mode}"), load(f"wc-{mode}")
    print(f"4 KiB random write QD32, {label}: IOPS per 10 s")
    print(f"{'interval':>10} {'lc':>8} {'dm-wc':>8} {'lc/dm-wc':>9}")
    for i in range(max(len(lc), len(wc))):
        a = lc[i] if i < len(lc) else None
        b = wc[i] if i < len(wc) else None
        r = f"{a / b:.2f}" if a is not None and b else "-"
        print(f"{f'{i * 10}-{i * 10 + 10}s':>10} {a if a is not None else '-':>8} {b if b is not None else '-':>8} {r:>9}")
    for name, xs in [("lc", lc), ("dm-writecache", wc)]:
        if xs and xs[0]:
            print(f"{name}, {label}: first {xs[0]}, min {min(xs)}, min/first {min(xs) / xs[0]:.2f}")
    print()
PY
