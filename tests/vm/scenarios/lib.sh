# Helpers shared by the guest scenarios (sourced).
set -euo pipefail
fail() {
    echo "FAIL: $*" >&2
    [ -f /tmp/lc.log ] && { echo "--- lc log"; tail -50 /tmp/lc.log; } >&2
    # Background load must not outlive the scenario and disturb the next one.
    jobs -p | xargs -r kill 2>/dev/null
    exit 1
}
# Each step says when it started (seconds into the scenario): where a slow run's time went.
step() { echo "--- [${SECONDS}s] $*"; }

start_lc() {
    mkdir -p /run/lc
    lc serve --config /etc/lc/lc.toml >>/tmp/lc.log 2>&1 &
    echo $! >/tmp/lc.pid
    # Ready when the control socket accepts a connection: after a kill -9 the old
    # daemon's socket file is still there until the new one binds it.
    for _ in $(seq 150); do
        [ -S /run/lc/control.sock ] && python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect("/run/lc/control.sock")' 2>/dev/null && return 0
        kill -0 "$(cat /tmp/lc.pid)" 2>/dev/null || fail "lc serve exited"
        sleep 0.2
    done
    fail "lc serve did not open its control socket"
}

stop_lc() {
    local pid; pid=$(cat /tmp/lc.pid)
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    fail "lc serve did not stop"
}

# The /dev/sdX of the loopback LUN whose SCSI model is $1, other than the devices
# named after it (a second LUN of the same model).
lun_dev() {
    local model=$1 d
    shift
    for _ in $(seq 100); do
        d=$(lsscsi | awk -v m="$model" '$3 == "LIO-ORG" && $4 == m {print $NF}' | grep -vxF -e "${1:-/none}" -e "${2:-/none}" | head -1 || true)
        if [ -n "$d" ] && [ -b "$d" ]; then echo "$d"; return 0; fi
        sleep 0.2
    done
    lsscsi >&2
    fail "no /dev/sdX with model $model"
}

# Splits $1 into two device-mapper halves named $2 and $3 (linear); prints the size of
# a half in sectors.
split_disk() {
    local half
    half=$(( $(blockdev --getsz "$1") / 2 ))
    dmsetup create "$2" --table "0 $half linear $1 0"
    dmsetup create "$3" --table "0 $half linear $1 $half"
    dmsetup mknodes
    echo "$half"
}

# Swaps the table of device-mapper device $1 for $2 under its users (a disk that dies
# or comes back).
retable() {
    dmsetup suspend "$1"
    dmsetup load "$1" --table "$2"
    dmsetup resume "$1"
}

# The harness makes loopback LUNs through configfs, as rtslib does: under TCG each
# targetcli call costs about 6 s (5 of them importing its Python modules), and the
# default run made some 60 of them for LUNs alone. The backstores themselves are
# created with targetcli (the user's path, which lc-basic and lc-reboot check).
cfs=/sys/kernel/config/target

# The configfs directory of the backstore targetcli calls $1 (/backstores/TYPE/NAME).
so_dir() {
    local type=${1#/backstores/} hba d
    type=${type%%/*}
    case $type in
    user:*) hba=user ;;
    block) hba=iblock ;;
    fileio) hba=fileio ;;
    ramdisk) hba=rd_mcp ;;
    *) fail "so_dir: backstore type $type" ;;
    esac
    for d in "$cfs"/core/"$hba"_*/"${1##*/}"; do
        [ -d "$d" ] && { echo "$d"; return 0; }
    done
    fail "so_dir: no $1 in configfs"
}

# Backstore $2 as the next LUN (lun_N, targetcli's lunN) of loopback target $1.
add_lun() {
    local tpg=$cfs/loopback/$1/tpgt_1 so n=0
    so=$(so_dir "$2")
    while [ -e "$tpg/lun/lun_$n" ]; do n=$((n + 1)); done
    mkdir "$tpg/lun/lun_$n"
    ln -s "$so" "$tpg/lun/lun_$n/port_$n"
}

# A new loopback target (its own SCSI host, the nexus set first so the LUN is scanned
# when it is added) with backstore $1 as LUN 0; prints the target's wwn.
loopback_lun() {
    local wwn
    naa() { echo "naa.5001405$(od -An -N5 -tx1 /dev/urandom | tr -d ' \n' | cut -c1-9)"; }
    wwn=$(naa)
    mkdir -p "$cfs/loopback/$wwn/tpgt_1"
    echo -n "$(naa)" >"$cfs/loopback/$wwn/tpgt_1/nexus"
    add_lun "$wwn" "$1"
    echo "$wwn"
}

# Wipes the start of cache device $1 (default /dev/vdb): its old superblock no cache
# can then mistake for its own.
fresh_ssd() {
    local d=${1:-/dev/vdb}
    wipefs -a "$d" >/dev/null 2>&1 || true
    dd if=/dev/zero of="$d" bs=1M count=1 oflag=direct status=none
}

# A device-mapper cache (dm name $2, table $3) behind a LIO block backstore through the
# loopback; runs the scenario's `row NAME DEV KEY` on it ($1 = name, $4 = key), then
# takes it all down.
lio_row() {
    dmsetup create "$2" --table "$3"
    dmsetup mknodes
    targetcli /backstores/block create name="${2}blk" dev="/dev/mapper/$2" >/dev/null
    loopback_lun "/backstores/block/${2}blk" >/dev/null
    row "$1" "$(lun_dev "${2}blk")" "$4"
    targetcli clearconfig confirm=True >/dev/null
    dmsetup remove "$2"
}

# One fio job on $1 (rw $2, block size $3, queue depth $4, more fio options after),
# the guest's page cache dropped first: prints its IOPS, or "failed" (e.g. I/O errors;
# the scenario's other jobs still run).
job() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    if fio --name=b --filename="$1" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" --iodepth="$4" "${@:5}" \
        --output-format=json --output=/tmp/job.json >/dev/null 2>&1; then
        python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(int(j["write"]["iops"] + j["read"]["iops"]))' \
            /tmp/job.json || echo failed
    else
        echo failed
    fi
}

# `job` for $RT seconds over the first 512 MiB (the benchmarks' timed jobs).
timed() { job "$@" --time_based --runtime="${RT:?}" --size=512M; }

fio_verify() {
    local dev=$1 size=$2 rw=${3:-randwrite}
    fio --name=verify --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw="$rw" \
        --size="$size" --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=1 --output-format=terse >/tmp/fio.out \
        || { cat /tmp/fio.out; fail "fio verify on $dev"; }
}

# Every scenario starts from a clean guest: no sessions, no LIO objects, no daemon,
# no device-mapper devices, the default config.
pkill -x fio >/dev/null 2>&1 || true
iscsiadm -m node --logoutall=all >/dev/null 2>&1 || true
# LUNs a scenario left after stopping lc: removing one makes sd (sd_remove ->
# sd_shutdown) send SYNCHRONIZE CACHE into a ring no daemon serves, which TCMU times
# out and sd retries (clearconfig took 100-165 s that way; an offline device still
# gets it). "temporary write through" clears sd's write-cache flag without a MODE
# SELECT, so sd sends no SYNCHRONIZE CACHE.
if ! pgrep -x lc >/dev/null; then
    for d in /sys/class/scsi_device/*/device; do
        grep -qs LIO-ORG "$d/vendor" || continue
        for c in "$d"/scsi_disk/*/cache_type; do
            echo "temporary write through" 2>/dev/null >"$c" || true
        done
    done
fi
targetcli clearconfig confirm=True >/dev/null 2>&1 || true
pkill -x lc >/dev/null 2>&1 || true
for _ in $(seq 50); do pgrep -x lc >/dev/null || break; sleep 0.2; done
dmsetup remove_all >/dev/null 2>&1 || true
rm -f /run/lc/control.sock /tmp/lc.log
cp /payload/lc.toml /etc/lc/lc.toml

# The guest's CPU model and clock source, for benchmark tables: under TCG the CPU
# is QEMU's model (LC_VM_CPU), whose features decide e.g. whether crc32c runs in
# hardware, and an unstable TSC makes every clock read an HPET access.
guest_cpu() {
    local f=/proc/cpuinfo
    printf '%s; sse4_2 %s; clocksource %s' \
        "$(grep -m1 'model name' $f | cut -d: -f2 | sed 's/^ //')" \
        "$(grep -qw sse4_2 $f && echo yes || echo no)" \
        "$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
}
