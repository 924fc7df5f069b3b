# The bench's random phases (issue 9) for lc and the rows it is compared with, in
# alternating rounds in one boot. The guest's speed drifts between boots and within
# one (the peers' own figures moved 2x between boots), so a ratio is only as good as
# the nearness in time of its two rows: here every round runs each device once, in an
# order that rotates from round to round, and each ratio is taken within a round.
# Devices: lc (the guest's default config: SSD cache + throttled HDD, freshly
# formatted), lc's RAM LUN (`backend = "ram"`: the TCMU path without the engine),
# dm-writecache and dm-writeboost behind a LIO `block` backstore on the same two disks
# (the SSD wiped first). Jobs per device, the guest's page cache dropped before each:
# 4 KiB random writes QD32 over 512 MiB, the same with an fsync every 32 writes, 4 KiB
# random reads QD32 (LC_BENCH_RUNTIME seconds each, default 15). Prints each round's
# rows, then per ratio its value in each round and the median (paired-table.txt in
# the results). LC_BENCH_ROUNDS rounds (default 3). Not part of the default run:
# tests/vm/run.sh paired
# timeout: 2400
source /payload/scenarios/lib.sh
RT=${LC_BENCH_RUNTIME:-15}
ROUNDS=${LC_BENCH_ROUNDS:-3}
out=/payload/results/paired-table.txt
vals=/tmp/paired-values
: >"$vals"
fmt='%-6s %-24s %10s %14s %10s\n'
row() { # name dev key (of round $round)
    local w f r
    w=$(timed "$2" randwrite 4k 32)
    f=$(timed "$2" randwrite 4k 32 --fsync=32)
    r=$(timed "$2" randread 4k 32)
    printf "$fmt" "$round" "$1" "$w" "$f" "$r" | tee -a "$out"
    echo "$round $3 $w $f $r" >>"$vals"
}
hdd_sectors=$(blockdev --getsz /dev/vdc)
modprobe dm-writecache || fail "dm-writecache: module not available"
modprobe dm-writeboost || fail "dm-writeboost: module not available"
lc_row() { # key: lc on the SSD + HDD, or its RAM LUN
    cp /payload/lc.toml /etc/lc/lc.toml
    printf '\n[[lun]]\nname = "ram0"\nbackend = "ram"\nsize = "1GiB"\n' >>/etc/lc/lc.toml
    lc format -y --force /dev/vdb >/dev/null
    start_lc
    if [ "$1" = lc ]; then
        targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 hw_max_sectors=2048 >/dev/null
        loopback_lun /backstores/user:lc/disk0 >/dev/null
        row "lc" "$(lun_dev lc)" lc
    else
        targetcli /backstores/user:lc create name=ram0 size=1G cfgstring=ram0 >/dev/null
        loopback_lun /backstores/user:lc/ram0 >/dev/null
        row "lc RAM LUN" "$(lun_dev lc)" ramlc
    fi
    targetcli clearconfig confirm=True >/dev/null
    stop_lc
}
dm_row() { # key: dm-writecache (wc) or dm-writeboost (wb), SSD wiped first
    fresh_ssd
    if [ "$1" = wc ]; then
        lio_row "dm-writecache (LIO)" wc "0 $hdd_sectors writecache s /dev/vdc /dev/vdb 4096 0" wc
    else
        lio_row "dm-writeboost (LIO)" wb "0 $hdd_sectors writeboost /dev/vdc /dev/vdb" wb
    fi
}
echo "guest: $(guest_cpu); ${RT} s per job, ${ROUNDS} rounds" | tee "$out"
printf "$fmt" "round" "device" "randwrite" "randwrite" "randread" | tee -a "$out"
printf "$fmt" "" "(IOPS, 4 KiB, QD32)" "" "fsync/32" "" | tee -a "$out"
keys=(lc wc ramlc wbl)
for round in $(seq 1 "$ROUNDS"); do
    for i in 0 1 2 3; do
        k=${keys[$(((i + round - 1) % 4))]}
        case $k in
            lc | ramlc) lc_row "$k" ;;
            wc) dm_row wc ;;
            wbl) dm_row wb ;;
        esac
    done
done
echo | tee -a "$out"
python3 - "$vals" <<'PY' | tee -a "$out"
import statistics, sys
cols = {"randwrite": 0, "fsync/32": 1, "randread": 2}
v = {}
for line in open(sys.argv[1]):
    rnd, k, *xs = line.split()
    v.setdefault(k if k != "wb" else "wbl", {})[rnd] = [int(x) if x.isdigit() else 0 for x in xs]
names = {"lc": "lc", "ramlc": "lc RAM LUN", "wc": "dm-writecache (LIO)", "wbl": "dm-writeboost (LIO)"}
def ratio(a, b, col, note):
    c = cols[col]
    rs = []
    for rnd in sorted(v.get(a, {})):
        x, y = v[a][rnd][c], v.get(b, {}).get(rnd, [0, 0, 0])[c]
        if x and y:
            rs.append(x / y)
    if not rs:
        print(f"{col}: {names[a]} / {names[b]}: n/a")
        return
    each = " ".join(f"{r:.2f}" for r in rs)
    med = statistics.median(rs)
    print(f"{col}: {names[a]} / {names[b]} = median {med:.2f}x (rounds: {each}){note}")
ratio("lc", "wc", "fsync/32", "; issue 9 asks >= 1.0")
ratio("lc", "wbl", "randwrite", "; issue 9 asks >= 1.0")
ratio("lc", "ramlc", "randwrite", "; issue 9 asks >= 0.9")
ratio("lc", "wc", "randwrite", "")
ratio("lc", "wc", "randread", "")
ratio("ramlc", "wc", "fsync/32", " (the TCMU path alone against the peer)")
PY
