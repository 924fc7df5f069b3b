# Write-around (issue 10): a long sequential write with `sequential_cutoff` on (the
# default, 4 MiB) goes around the cache and leaves what the cache held cached; with
# the cutoff off (0) the stream takes the cache and the hot data ends up on the HDD.
# Per setting, on a fresh cache, a LUN over the whole 2 GiB HDD: 64 MiB of hot data
# written by 4 KiB random writes (cached), a read pass over it, then a sequential
# stream of 1 MiB writes QD4 over the rest of the LUN (1.9 GiB, more than the 1 GiB
# cache), then the hot read pass again. Prints IOPS of the read passes and what lc
# counted. Not part of the default run: tests/vm/run.sh streams
# (LC_BENCH_RUNTIME: seconds per read pass, default 15).
# timeout: 2400
source /payload/scenarios/lib.sh
RT=${LC_BENCH_RUNTIME:-15}
out=/payload/results/streams-table.txt
fmt='%-26s %10s %12s %10s %12s %12s\n'
printf "$fmt" "sequential_cutoff" "hot before" "stream 1M" "hot after" "bypassed MiB" "dirty lines" | tee "$out"
size=$(blockdev --getsize64 /dev/vdc)
for cutoff in 4194304 0; do
    cp /payload/lc.toml /etc/lc/lc.toml
    sed -i "/^device = /a [cache.tunables]\nsequential_cutoff = $cutoff" /etc/lc/lc.toml
    lc format -y --force /dev/vdb >/dev/null
    start_lc
    targetcli /backstores/user:lc create name=disk0 size="$size" cfgstring=disk0 hw_max_sectors=2048 >/dev/null
    loopback_lun /backstores/user:lc/disk0 >/dev/null
    d=$(lun_dev lc)
    fio --name=hot --filename="$d" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=32 \
        --size=64M >/dev/null 2>&1 || fail "hot writes"
    h1=$(job "$d" randread 4k 32 --size=64M --time_based --runtime="$RT")
    s=$(job "$d" write 1M 4 --offset=128M --size=$((size - (128 << 20))))
    h2=$(job "$d" randread 4k 32 --size=64M --time_based --runtime="$RT")
    st=$(lc stats c0 --json)
    by=$(python3 -c '
import json, sys
def find(o):
    if isinstance(o, dict):
        if "bypassed_bytes" in o and "dirty_lines" in o:
            return o
        for v in o.values():
            r = find(v)
            if r:
                return r
c = find(json.loads(sys.argv[1]))
print(c["bypassed_bytes"] >> 20, sum(x["lines"] for x in c["dirty_lines"]))' "$st" 2>/dev/null || echo "? ?")
    printf "$fmt" "$cutoff" "$h1" "$s" "$h2" $by | tee -a "$out"
    targetcli clearconfig confirm=True >/dev/null
    stop_lc
done
