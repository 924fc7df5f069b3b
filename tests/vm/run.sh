#!/usr/bin/env bash
# The real-kernel test harness: one command. Builds or reuses the guest image
# (build-image.sh), builds lc, boots a QEMU guest (TCG; KVM hangs on these machines)
# with a cache "SSD" disk and a throttled "HDD" disk, runs the scenarios inside it and
# prints a pass/fail summary. Exit status is non-zero on any failure or timeout.
#
#   tests/vm/run.sh                 # all default scenarios
#   tests/vm/run.sh selftest lc-basic
#
# Results and logs: $LC_VM_RESULTS (default target/vm-results).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(selftest lc-basic lc-durability lc-drain lc-faults lc-damage lc-isolation lc-scsi lc-enable-wait lc-reboot lc-powercut)
results=${LC_VM_RESULTS:-$top/target/vm-results}
log() { echo "[vm $(date +%T)] $*" >&2; }
t0=$(date +%s)

if ! command -v qemu-system-x86_64 >/dev/null; then
    log "installing qemu-system-x86"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-system-x86 >&2
fi
image=$("$here/build-image.sh" | tail -1)
t_image=$(date +%s)
log "image $image ($((t_image - t0)) s)"

log "building lc (release)"
lc_bin=$("$here/build-lc.sh")   # as the user who ran sudo, if run with sudo

payload=$(mktemp -d "${TMPDIR:-/tmp}/lc-vm-payload.XXXXXX")
trap 'rm -rf "$payload"' EXIT
mkdir -p "$payload/bin" "$payload/results" "$payload/scenarios" "$payload/disks"
cp "$lc_bin" "$payload/bin/lc"
cp "$here"/scenarios/*.sh "$payload/scenarios/"
cp "$here/guest/guest-init.sh" "$payload/guest-init.sh"
cp "$here/guest/lc.toml" "$payload/lc.toml"
cp "$top/targetcli/lc-dbus.conf" "$payload/lc-dbus.conf"
printf '%s\n' "${scenarios[@]}" >"$payload/scenarios.list"
# The scenarios' knobs reach the guest through the payload (guest-init.sh sources it):
# LC_BENCH_*, LC_SUSTAINED_*, LC_PROFILE_*, LC_SCENARIO_TIMEOUT.
for v in $(compgen -e | grep -E '^LC_(BENCH|SUSTAINED|PROFILE)_|^LC_SCENARIO_TIMEOUT$' || true); do
    printf 'export %s=%q\n' "$v" "${!v}"
done >"$payload/env"
for s in "${scenarios[@]}"; do
    [ -f "$here/scenarios/$s.sh" ] || { echo "no scenario $s (tests/vm/scenarios/$s.sh)" >&2; exit 2; }
done

# Disks: the root image is used read-only through a snapshot; cache and HDD are fresh.
disks=${LC_VM_DISKS:-$payload/disks}
mkdir -p "$disks"
# Written whole (zeros), not sparse: in a sparse image the host file system allocates
# blocks wherever the guest writes first (and commits its journal at the guest's next
# flush), a cost no real disk has, and one that falls on whichever device of a
# comparison writes a region first (lc ran first on a fresh disk in the sustained runs).
[ -f "$disks/ssd.img" ] || dd if=/dev/zero of="$disks/ssd.img" bs=1M count=1024 conv=fsync status=none
[ -f "$disks/hdd.img" ] || dd if=/dev/zero of="$disks/hdd.img" bs=1M count=2048 conv=fsync status=none

boot() {
    local accel="-accel tcg,thread=multi"
    timeout "${LC_VM_TIMEOUT:-3000}" qemu-system-x86_64 $accel -cpu "${LC_VM_CPU:-qemu64}" -m 2048 -smp 2 -nographic -no-reboot \
        -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 init=/sbin/lc-init panic=-1 quiet ${LC_VM_CMDLINE:-}" \
        -drive "file=$image/rootfs.img,if=virtio,format=raw,snapshot=on" \
        -drive "file=$disks/ssd.img,if=virtio,format=raw,cache=none,aio=threads" \
        -drive "file=$disks/hdd.img,if=virtio,format=raw,cache=none,aio=threads,throttling.iops-total=${LC_VM_HDD_IOPS:-300}" \
        -virtfs "local,path=$payload,mount_tag=payload,security_model=none" \
        >"$payload/results/serial.log" 2>&1
}
log "booting the guest (TCG) for: ${scenarios[*]}"
t_boot=$(date +%s)
set +e
boot
qrc=$?
# A scenario X with a second half (scenarios/X-2.sh: a hard power-off, a reboot)
# continues in a second boot on the same disks and payload.
second=()
for s in "${scenarios[@]}"; do
    [ -f "$here/scenarios/$s-2.sh" ] && second+=("$s-2")
done
if [ ${#second[@]} -gt 0 ]; then
    log "second boot for: ${second[*]}"
    mv "$payload/results/serial.log" "$payload/results/serial-boot1.log"
    mv "$payload/results/console.log" "$payload/results/console-boot1.log" 2>/dev/null
    printf '%s\n' "${second[@]}" >"$payload/scenarios.list"
    boot
    qrc=$?
    scenarios+=("${second[@]}")
fi
set -e
t_end=$(date +%s)

rm -rf "$results"
mkdir -p "$results"
cp -r "$payload/results/." "$results/"
# Under sudo the results belong to the user who ran it (they usually sit in target/).
if [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_UID:-}" ]; then
    chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$results"
fi
pass=0; fail=0
printf '\n%-20s %-6s %s\n' SCENARIO RESULT SECONDS
for s in "${scenarios[@]}"; do
    if [ -f "$results/$s.rc" ]; then
        read -r rc secs <"$results/$s.rc"
    else
        rc=timeout; secs=-
    fi
    if [ "$rc" = 0 ]; then res=PASS; pass=$((pass + 1)); else res=FAIL; fail=$((fail + 1)); fi
    printf '%-20s %-6s %s\n' "$s" "$res" "$secs"
done
# A failure explains itself in CI's output: the end of its scenario log, the daemon's
# log and the kernel's log.
for s in "${scenarios[@]}"; do
    [ -f "$results/$s.rc" ] && [ "$(cut -d' ' -f1 "$results/$s.rc")" = 0 ] && continue
    for f in "$s.log" "$s.lc.log" "$s.dmesg.log"; do
        [ -f "$results/$f" ] || continue
        echo
        echo "--- last lines of $f"
        tail -40 "$results/$f"
    done
done
if [ "$fail" -ne 0 ] && [ -f "$results/serial.log" ]; then
    echo
    echo "--- last lines of serial.log"
    tail -20 "$results/serial.log"
fi
echo
echo "image $((t_image - t0)) s, guest $((t_end - t_boot)) s (qemu exit $qrc); logs in $results"
echo "vm: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
