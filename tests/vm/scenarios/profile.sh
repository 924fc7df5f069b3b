# Where the time goes on the lc path in the guest (not part of the default run):
# tests/vm/run.sh profile. At 4 KiB, against LIO's in-kernel ramdisk backstore through
# the same loopback (the ceiling of any LIO backstore here) and against lc with writes
# and reads that stay in RAM, for several daemon busy-poll settings; plus TEST UNIT
# READY round trips (no I/O at all) and the CPU split while lc serves.
source /payload/scenarios/lib.sh
RT=${LC_BENCH_RUNTIME:-10}
iops() { # dev rw qd size
    fio --name=p --filename="$1" --direct=1 --ioengine=libaio --rw="$2" --bs=4k --iodepth="$3" \
        --time_based --runtime="$RT" --size="$4" --output-format=json 2>/dev/null \
        | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["write"]["iops"] + j["read"]["iops"]))'
}
turs() { local t; t=$(date +%s.%N); sg_turs -n 3000 "$1" >/dev/null 2>&1; python3 -c "print(int(3000/($(date +%s.%N)-$t)))"; }
cpu() { awk '/^cpu /{print $2+$3, $4, $5, $6, $7+$8}' /proc/stat; } # user system idle iowait irq
targetcli /backstores/ramdisk create name=r0 size=64M >/dev/null
loopback_lun /backstores/ramdisk/r0 >/dev/null
d=$(lun_dev r0)
echo "ramdisk backstore: randwrite QD32 $(iops "$d" randwrite 32 16M)  randread QD32 $(iops "$d" randread 32 16M)  randwrite QD1 $(iops "$d" randwrite 1 16M)  TUR/s $(turs "$d")"
targetcli clearconfig confirm=True >/dev/null
for poll in ${LC_PROFILE_POLL:-0 100 1000}; do
    cp /payload/lc.toml /etc/lc/lc.toml
    sed -i "/^\[daemon\]/a busy_poll_us = $poll" /etc/lc/lc.toml
    lc format -y --force /dev/vdb >/dev/null
    start_lc
    targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 >/dev/null
    loopback_lun /backstores/user:lc/disk0 >/dev/null
    d=$(lun_dev lc)
    pid=$(cat /tmp/lc.pid)
    threads() { for t in /proc/$pid/task/*; do echo "$(cat $t/comm) $(awk '{print $14+$15}' $t/stat)"; done | sort; }
    threads >/tmp/t0; c0=$(cpu)
    w=$(iops "$d" randwrite 32 16M)
    c1=$(cpu); threads >/tmp/t1
    echo "lc busy_poll_us=$poll: randwrite QD32 $w  randread QD32 $(iops "$d" randread 32 16M)  randwrite QD1 $(iops "$d" randwrite 1 16M)  TUR/s $(turs "$d")"
    echo "  cpu ticks in randwrite (user system idle iowait irq): $(python3 -c "a='$c0'.split(); b='$c1'.split(); print(' '.join(str(int(y)-int(x)) for x,y in zip(a,b)))")"
    echo "  lc threads' cpu ticks: $(join /tmp/t0 /tmp/t1 | awk '{d=$3-$2; if (d>0) printf "%s=%d ", $1, d}')"
    lc stats c0 | grep -E "counters.(read|write)_hit_ram_full|counters.read_hit_disk_full" | tr -s ' ' | tr '\n' ' '; echo
    targetcli clearconfig confirm=True >/dev/null
    stop_lc
done
