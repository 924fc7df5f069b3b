# Issue 7 on the real kernel: one bad device never stalls the others.
#  1. LUN disk0's backing device hangs (dm suspend): disk1's 4 KiB reads keep a p99
#     below 100 ms.
#  2. disk0's backing device dies (dm error) while its cache holds dirty data: disk0's
#     writes fail within 18 s (writeback_fail_timeout_s, set to 8 here) instead of
#     hanging, disk1 (another cache) keeps its write speed, and nothing acknowledged is
#     lost once the device is back.
#  3. SIGTERM under fio load at QD32, then a restart: no command aborted or timed out
#     in the kernel log.
source /payload/scenarios/lib.sh
split_disk /dev/vdb ssdA ssdB >/dev/null
hhalf=$(split_disk /dev/vdc hddA hddB)
lc format -y --force /dev/mapper/ssdA >/dev/null
lc format -y --force /dev/mapper/ssdB >/dev/null
cat >/etc/lc/lc.toml <<TOML
[daemon]
control_socket = "/run/lc/control.sock"
[[cache]]
name = "c0"
device = "/dev/mapper/ssdA"
o_direct = true
[cache.tunables]
writeback_fail_timeout_s = 8
[[cache]]
name = "c1"
device = "/dev/mapper/ssdB"
o_direct = true
[[lun]]
name = "disk0"
cache = "c0"
backing = "/dev/mapper/hddA"
backing_id = 0
[[lun]]
name = "disk1"
cache = "c1"
backing = "/dev/mapper/hddB"
backing_id = 0
TOML
start_lc
targetcli /backstores/user:lc create name=disk0 size=512M cfgstring=disk0 >/dev/null
targetcli /backstores/user:lc create name=disk1 size=512M cfgstring=disk1 >/dev/null
wwn=$(loopback_lun /backstores/user:lc/disk0)
d0=$(lun_dev lc)
add_lun "$wwn" /backstores/user:lc/disk1
d1=$(lun_dev lc "$d0")
echo "disk0 is $d0, disk1 is $d1"

diag() {
    echo "--- diagnostics: $*"
    ps -eo pid,stat,wchan:32,args | grep -E "dd |fio|lc |dmsetup" | grep -v grep
    for t in /proc/"$(cat /tmp/lc.pid)"/task/*; do
        echo "task $(cat "$t/comm"): $(tr '\n' ' ' <"$t/stack" 2>/dev/null | cut -c1-300)"
    done
    dmsetup info -c
    dmesg | tail -30
    fail "$*"
}
p99_ms() { python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(round(j["jobs"][0]["read"]["clat_ns"]["percentile"]["99.000000"]/1e6, 2))' "$1"; }
iops() { python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(int(j["jobs"][0][sys.argv[2]]["iops"]))' "$1" "$2"; }

step "1. disk0's backing device hangs; disk1's cached 4 KiB reads"
dd if=/dev/urandom of="$d1" bs=1M count=32 oflag=direct conv=fsync status=none
fio --name=base --filename="$d1" --direct=1 --ioengine=libaio --iodepth=1 --bs=4k --rw=randread \
    --size=32M --runtime=8 --time_based --output-format=json >/tmp/base.json
echo "disk1 read p99 before: $(p99_ms /tmp/base.json) ms"
dmsetup suspend hddA
# Eight readers of disk0's (uncached) backing device: they hang in the daemon's workers.
readers=()
for i in $(seq 8); do
    dd if="$d0" of=/dev/null bs=4k count=1 skip=$((i * 1000)) iflag=direct status=none 2>/dev/null &
    readers+=($!)
done
sleep 2
fio --name=hung --filename="$d1" --direct=1 --ioengine=libaio --iodepth=1 --bs=4k --rw=randread \
    --size=32M --runtime=10 --time_based --output-format=json >/tmp/hung.json
p99=$(p99_ms /tmp/hung.json)
echo "disk1 read p99 while disk0's backing device hangs: $p99 ms"
timeout 30 dmsetup resume hddA || diag "dmsetup resume hung"
for _ in $(seq 120); do
    alive=0; for p in "${readers[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.5
done
[ "$alive" = 0 ] || diag "disk0's readers still hang 60 s after its backing device came back"
python3 -c "import sys; sys.exit(0 if float('$p99') <= 100 else 1)" \
    || fail "disk1's reads stalled behind disk0's hung backing device (p99 $p99 ms)"

step "2. disk0's backing device dies with dirty data in its cache"
lc set c0 writeback_enabled false
head -c 64M /dev/urandom >/tmp/acked
dd if=/tmp/acked of="$d0" bs=1M oflag=direct conv=fsync status=none
# A writer on disk0 throughout both measurements (the same load on the path either
# way); it records when its first write failed.
writer() {
    local i=0 t0=$1
    rm -f /tmp/writer.stop /tmp/writer.failed
    while [ ! -e /tmp/writer.stop ]; do
        if ! dd if=/dev/zero of="$d0" bs=1M count=1 seek=$((128 + i % 256)) oflag=direct status=none 2>/dev/null; then
            [ -e /tmp/writer.failed ] || echo $(( $(date +%s) - t0 )) >/tmp/writer.failed
            sleep 0.2
        fi
        i=$((i + 1))
    done
}
writer "$(date +%s)" & wpid=$!
fio --name=w --filename="$d1" --direct=1 --ioengine=libaio --iodepth=32 --bs=4k --rw=randwrite \
    --size=128M --runtime=15 --time_based --output-format=json >/tmp/w_before.json
touch /tmp/writer.stop; wait "$wpid"
[ -e /tmp/writer.failed ] && fail "disk0's writes failed while its backing device was healthy"
retable hddA "0 $hhalf error"
lc set c0 writeback_threshold 0
lc set c0 writeback_enabled true
writer "$(date +%s)" & wpid=$!
fio --name=w --filename="$d1" --direct=1 --ioengine=libaio --iodepth=32 --bs=4k --rw=randwrite \
    --size=128M --runtime=15 --time_based --output-format=json >/tmp/w_during.json
for _ in $(seq 100); do [ -e /tmp/writer.failed ] && break; sleep 0.5; done
touch /tmp/writer.stop; wait "$wpid"
lc status | tee /tmp/status.out
[ -e /tmp/writer.failed ] || fail "writes to the LUN whose backing device died never failed"
failed_after=$(cat /tmp/writer.failed)
echo "disk0's writes fail $failed_after s after its backing device died"
[ "$failed_after" -le 18 ] || fail "disk0's writes took $failed_after s to fail"
grep -q "writeback failing since" /tmp/status.out || fail "lc status does not show the failing writeback"
before=$(iops /tmp/w_before.json write); during=$(iops /tmp/w_during.json write)
echo "disk1 (cache c1) random writes beside a writer on disk0: $before IOPS while disk0 is healthy, $during IOPS while its backing device is dead"
python3 -c "import sys; sys.exit(0 if $during >= 0.7 * $before else 1)" \
    || fail "disk1 slowed down to $during from $before IOPS"
step "disk0's backing device comes back: writeback recovers, nothing acknowledged lost"
retable hddA "0 $hhalf linear /dev/vdc 0"
for _ in $(seq 60); do lc status | grep -q "writeback failing" || break; sleep 1; done
lc status | grep -q "writeback failing" && fail "writeback did not recover"
dd if=/dev/zero of="$d0" bs=1M count=1 seek=300 oflag=direct conv=fsync status=none || fail "disk0 still refuses writes"
cmp <(dd if="$d0" bs=1M count=64 iflag=direct status=none) /tmp/acked || fail "acknowledged data lost"
lc drain disk0 >/dev/null

step "3. SIGTERM under fio QD32, restart: no aborts or timeouts"
dmesg -C
fio --name=t --filename="$d1" --direct=1 --ioengine=libaio --iodepth=32 --bs=4k --rw=randwrite \
    --size=128M --runtime=15 --time_based --output-format=terse >/tmp/term.out 2>&1 &
fio_pid=$!
sleep 5
pid=$(cat /tmp/lc.pid)
kill -TERM "$pid"
t=$(date +%s)
wait "$pid" 2>/dev/null || true
echo "lc stopped in $(( $(date +%s) - t )) s"
rm -f /run/lc/control.sock
start_lc
wait "$fio_pid" || { cat /tmp/term.out; fail "fio saw errors across the stop"; }
dmesg | grep -iE "abort|timing out|timed out|host reset|device reset|bus reset" >/tmp/aborts.txt || true
[ -s /tmp/aborts.txt ] && { cat /tmp/aborts.txt; fail "commands aborted or timed out across SIGTERM"; }
echo "kernel log across the stop:"; dmesg
echo "lc-isolation ok"
