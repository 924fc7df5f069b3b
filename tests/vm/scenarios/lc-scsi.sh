# Issue 12, "a SCSI disk every initiator can use", on the real kernel: raw CDBs through
# the loopback /dev/sdX (sg3-utils) with the status and sense of each checked:
# standard INQUIRY version descriptors and Block Limits; READ/WRITE of 129..256 blocks
# in every CDB size; READs into a shorter buffer (GOOD, what fits); REPORT SUPPORTED
# OPERATION CODES (options 1/2 errors, RCTD); COMPARE AND WRITE (match, MISCOMPARE with
# the offset, four racing initiators of which exactly one wins); GET LBA STATUS; WRITE
# AND VERIFY; VERIFY with BYTCHK; ext4 + fstrim; then the same commands over iSCSI,
# and a persistent reservation held over iSCSI refusing the loopback initiator's writes;
# EXTENDED COPY (sg_xcopy) within a LUN and to a second LUN of the daemon.
source /payload/scenarios/lib.sh

# sgr WANT INFO -- SG_RAW_ARGS...: runs sg_raw -v and checks the outcome. WANT is
# "good", "conflict" (RESERVATION CONFLICT) or "Sense key text|Additional sense text"
# as sg3-utils prints them; INFO, if not empty, is the decimal INFORMATION field.
sgr() {
    local want=$1 info=${2:-} rc=0
    shift 2
    [ "$1" = -- ] && shift
    sg_raw -v "$@" >/tmp/sgr.out 2>&1 || rc=$?
    if [ "$want" = good ]; then
        grep -q "SCSI Status: Good" /tmp/sgr.out && [ $rc = 0 ] \
            || { cat /tmp/sgr.out; fail "sg_raw $* : expected GOOD (rc $rc)"; }
        return 0
    fi
    if [ "$want" = conflict ]; then
        grep -q "SCSI Status: Reservation Conflict" /tmp/sgr.out \
            || { cat /tmp/sgr.out; fail "sg_raw $* : expected RESERVATION CONFLICT"; }
        return 0
    fi
    grep -q "SCSI Status: Check Condition" /tmp/sgr.out \
        || { cat /tmp/sgr.out; fail "sg_raw $* : expected CHECK CONDITION"; }
    grep -qi "Sense key: ${want%%|*}" /tmp/sgr.out \
        || { cat /tmp/sgr.out; fail "sg_raw $* : expected sense key ${want%%|*}"; }
    grep -qi "Additional sense: ${want#*|}" /tmp/sgr.out \
        || { cat /tmp/sgr.out; fail "sg_raw $* : expected ${want#*|}"; }
    if [ -n "$info" ]; then
        grep -q "Info fld=0x[0-9a-f]* \[$info\]" /tmp/sgr.out \
            || { cat /tmp/sgr.out; fail "sg_raw $* : expected INFORMATION $info"; }
    fi
    return 0
}
# hexat FILE OFFSET LEN: the bytes as one hex string.
hexat() { od -An -v -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }
# be32 / be16 / be64 N: CDB bytes (sg_raw arguments) of N big-endian.
be() { local n=$1 w=$2 i; for ((i = w - 1; i >= 0; i--)); do printf '%02x ' $(((n >> (8 * i)) & 255)); done; }
be16() { be "$1" 2; }
be32() { be "$1" 4; }
be64() { be "$1" 8; }
pat() { # pat FILE BLOCKS SEED: reproducible non-zero data
    python3 - "$@" <<'PY'
import sys, random
f, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
open(f, "wb").write(bytes(r.randrange(1, 256) for _ in range(n * 512)))
PY
}

# The commands of items 1-6 against one block device.
scsi_checks() {
    local dev=$1 where=$2
    step "$where: standard INQUIRY claims SAM-5, SPC-4, SBC-3"
    sg_inq -d "$dev" | tee /tmp/inq.txt
    grep -q "SPC-4" /tmp/inq.txt || fail "no SPC-4 version descriptor"
    grep -q "SBC-3" /tmp/inq.txt || fail "no SBC-3 version descriptor"
    step "$where: Block Limits: max transfer = the data area, optimal = hw_max_sectors, CAW length"
    sg_vpd -p bl "$dev" | tee /tmp/bl.txt
    grep -qi "compare and write length: 255" /tmp/bl.txt || fail "MAXIMUM COMPARE AND WRITE LENGTH"
    grep -qi "Maximum transfer length: 2097152" /tmp/bl.txt || fail "MAXIMUM TRANSFER LENGTH (1 GiB data area)"
    grep -qi "Optimal transfer length: 128" /tmp/bl.txt || fail "OPTIMAL TRANSFER LENGTH (hw_max_sectors)"

    step "$where: READ/WRITE of 129, 200 and 256 blocks in every CDB size"
    local n lba=4096
    for n in 129 200 256; do
        pat /tmp/w.bin "$n" "$n"
        local len=$((n * 512))
        # shellcheck disable=SC2046
        sgr good "" -- -s $len -i /tmp/w.bin "$dev" 2a 00 $(be32 $lba) 00 $(be16 "$n") 00
        sgr good "" -- -r $len -o /tmp/r.bin "$dev" 28 00 $(be32 $lba) 00 $(be16 "$n") 00
        cmp /tmp/w.bin /tmp/r.bin || fail "READ(10) of $n blocks"
        sgr good "" -- -s $len -i /tmp/w.bin "$dev" aa 00 $(be32 $((lba + 512))) $(be32 "$n") 00 00
        sgr good "" -- -r $len -o /tmp/r.bin "$dev" a8 00 $(be32 $((lba + 512))) $(be32 "$n") 00 00
        cmp /tmp/w.bin /tmp/r.bin || fail "READ(12) of $n blocks"
        sgr good "" -- -s $len -i /tmp/w.bin "$dev" 8a 00 $(be64 $((lba + 1024))) $(be32 "$n") 00 00
        sgr good "" -- -r $len -o /tmp/r.bin "$dev" 88 00 $(be64 $((lba + 1024))) $(be32 "$n") 00 00
        cmp /tmp/w.bin /tmp/r.bin || fail "READ(16) of $n blocks"
    done
    # READ(6) with TRANSFER LENGTH 0 is 256 blocks.
    sgr good "" -- -r 131072 -o /tmp/r.bin "$dev" 08 00 $(be16 $((lba + 1024))) 00 00
    cmp /tmp/w.bin /tmp/r.bin || fail "READ(6) of 256 blocks"

    step "$where: READs into a shorter buffer: GOOD, what fits"
    pat /tmp/w.bin 2 7
    sgr good "" -- -s 1024 -i /tmp/w.bin "$dev" 2a 00 $(be32 100) 00 00 02 00
    for cdb in "28 00 $(be32 100) 00 00 01 00" "a8 00 $(be32 100) $(be32 1) 00 00" "88 00 $(be64 100) $(be32 1) 00 00"; do
        # shellcheck disable=SC2086
        sgr good "" -- "$dev" $cdb                      # one block, no buffer at all
        # shellcheck disable=SC2086
        sgr good "" -- -r 200 -o /tmp/r.bin "$dev" $cdb # one block, 200 bytes
        cmp /tmp/r.bin <(head -c 200 /tmp/w.bin) || fail "200 bytes of one block ($cdb)"
    done
    sgr good "" -- -r 512 -o /tmp/r.bin "$dev" 28 00 $(be32 100) 00 00 02 00
    cmp /tmp/r.bin <(head -c 512 /tmp/w.bin) || fail "one block of two"

    step "$where: REPORT SUPPORTED OPERATION CODES"
    sg_opcodes "$dev" | tee /tmp/opc.txt
    grep -qi "compare and write" /tmp/opc.txt || fail "COMPARE AND WRITE not listed"
    grep -qi "get lba status" /tmp/opc.txt || fail "GET LBA STATUS not listed"
    grep -qi "write and verify" /tmp/opc.txt || fail "WRITE AND VERIFY not listed"
    sgr "Illegal Request|Invalid field in cdb" "" -- -r 64 "$dev" a3 0c 01 9e 00 00 00 00 00 40 00 00
    sgr "Illegal Request|Invalid field in cdb" "" -- -r 64 "$dev" a3 0c 02 28 00 00 00 00 00 40 00 00
    sgr good "" -- -r 64 -o /tmp/r.bin "$dev" a3 0c 81 2a 00 00 00 00 00 40 00 00
    [ "$(hexat /tmp/r.bin 0 4)" = 0083000a ] || fail "RCTD: CTDP and a 10-byte CDB usage"
    [ "$(hexat /tmp/r.bin 14 4)" = 000a0000 ] || fail "RCTD: command timeouts descriptor"
    [ "$(stat -c %s /tmp/r.bin)" = 26 ] || fail "RCTD: 4 + 10 + 12 bytes"
    sg_opcodes --rctd "$dev" >/tmp/opct.txt 2>&1 || { cat /tmp/opct.txt; fail "sg_opcodes --rctd"; }
    grep -i "write(10)" /tmp/opct.txt

    step "$where: COMPARE AND WRITE"
    pat /tmp/a.bin 1 11
    pat /tmp/b.bin 1 12
    sgr good "" -- -s 512 -i /tmp/a.bin "$dev" 2a 00 $(be32 300) 00 00 01 00
    cat /tmp/a.bin /tmp/b.bin >/tmp/ab.bin
    sgr good "" -- -s 1024 -i /tmp/ab.bin "$dev" 89 00 $(be64 300) 00 00 00 01 00 00
    sgr good "" -- -r 512 -o /tmp/r.bin "$dev" 28 00 $(be32 300) 00 00 01 00
    cmp /tmp/r.bin /tmp/b.bin || fail "COMPARE AND WRITE did not write"
    # The compare data differs at byte 77: MISCOMPARE, INFORMATION 77, nothing written.
    python3 -c 'import sys; b=bytearray(open("/tmp/b.bin","rb").read()); b[77]^=1; sys.stdout.buffer.write(bytes(b))' >/tmp/stale.bin
    cat /tmp/stale.bin /tmp/a.bin >/tmp/sa.bin
    sgr "Miscompare|Miscompare during verify operation" 77 -- -s 1024 -i /tmp/sa.bin "$dev" 89 00 $(be64 300) 00 00 00 01 00 00
    sgr good "" -- -r 512 -o /tmp/r.bin "$dev" 28 00 $(be32 300) 00 00 01 00
    cmp /tmp/r.bin /tmp/b.bin || fail "a miscompared COMPARE AND WRITE wrote"
    sg_compare_and_write --in=/tmp/b.bin --inw=/tmp/a.bin --lba=300 "$dev" || fail "sg_compare_and_write"
    step "$where: COMPARE AND WRITE from four initiators at once, under fio load: one wins per round"
    fio --name=load --filename="$dev" --direct=1 --ioengine=libaio --iodepth=8 --bs=4k --rw=randrw \
        --offset=64M --size=64M --time_based --runtime=30 >/dev/null 2>&1 &
    local fio_pid=$! round k wins winner pids
    for round in 1 2 3; do
        # Write data unlike anything the block held before (else a second initiator
        # would find its compare data still there after the first one's write).
        for k in 1 2 3 4; do pat "/tmp/w$k.bin" 1 $((1000 + round * 10 + k)); done
        sgr good "" -- -r 512 -o /tmp/cur.bin "$dev" 28 00 $(be32 300) 00 00 01 00
        pids=()
        for k in 1 2 3 4; do
            (rc=0; sg_compare_and_write --in=/tmp/cur.bin --inw="/tmp/w$k.bin" --lba=300 "$dev" \
                >/dev/null 2>&1 || rc=$?; echo $rc >"/tmp/caw$k.rc") &
            pids+=($!)
        done
        wait "${pids[@]}"
        wins=0
        for k in 1 2 3 4; do
            case $(cat "/tmp/caw$k.rc") in
            0) wins=$((wins + 1)); winner=$k ;;
            14) ;; # SG_LIB_CAT_MISCOMPARE
            *) fail "round $round initiator $k: exit $(cat /tmp/caw$k.rc)" ;;
            esac
        done
        [ "$wins" = 1 ] || fail "round $round: $wins COMPARE AND WRITEs won"
        sgr good "" -- -r 512 -o /tmp/r.bin "$dev" 28 00 $(be32 300) 00 00 01 00
        cmp /tmp/r.bin "/tmp/w$winner.bin" || fail "round $round: block is not the winner's"
    done
    kill "$fio_pid" 2>/dev/null || true
    wait "$fio_pid" 2>/dev/null || true

    step "$where: GET LBA STATUS (every block reported mapped)"
    sg_get_lba_status --lba=0 "$dev" | tee /tmp/gls.txt || fail "sg_get_lba_status"
    sgr good "" -- -r 24 -o /tmp/r.bin "$dev" 9e 12 $(be64 10) $(be32 24) 00 00
    [ "$(hexat /tmp/r.bin 0 4)" = 00000014 ] || fail "GET LBA STATUS: one descriptor"
    [ "$(hexat /tmp/r.bin 8 12)" = "000000000000000a$(printf %08x $((2097152 - 10)))" ] \
        || fail "GET LBA STATUS: LBA 10 to the end"
    [ "$(hexat /tmp/r.bin 20 1)" = 00 ] || fail "GET LBA STATUS: mapped"
    sgr "Illegal Request|Logical block address out of range" "" -- -r 24 "$dev" 9e 12 $(be64 2097152) $(be32 24) 00 00

    step "$where: WRITE AND VERIFY, VERIFY with BYTCHK"
    pat /tmp/w.bin 4 21
    sgr good "" -- -s 2048 -i /tmp/w.bin "$dev" 2e 02 $(be32 400) 00 00 04 00
    sgr good "" -- -s 2048 -i /tmp/w.bin "$dev" 8e 12 $(be64 404) $(be32 4) 00 00
    sgr good "" -- -r 2048 -o /tmp/r.bin "$dev" 28 00 $(be32 404) 00 00 04 00
    cmp /tmp/r.bin /tmp/w.bin || fail "WRITE AND VERIFY(16) data"
    sgr good "" -- -s 2048 -i /tmp/w.bin "$dev" 2f 02 $(be32 400) 00 00 04 00
    sgr good "" -- "$dev" 8f 10 $(be64 400) $(be32 8) 00 00 # BYTCHK 0, DPO
    python3 -c 'import sys; b=bytearray(open("/tmp/w.bin","rb").read()); b[1500]^=0x80; sys.stdout.buffer.write(bytes(b))' >/tmp/v.bin
    sgr "Miscompare|Miscompare during verify operation" 1500 -- -s 2048 -i /tmp/v.bin "$dev" 2f 12 $(be32 400) 00 00 04 00
    sgr "Illegal Request|Invalid field in cdb" "" -- -s 2048 -i /tmp/w.bin "$dev" 2f 04 $(be32 400) 00 00 04 00
}

step "format the cache, start lc (disk0 on the HDD, disk1 on a file), disk0 on a loopback LUN"
lc format -y --force /dev/vdb
truncate -s 64M /var/tmp/disk1.img
cat >>/etc/lc/lc.toml <<'EOF'

[[lun]]
name = "disk1"
cache = "c0"
backing = "/var/tmp/disk1.img"
backing_id = 1
EOF
start_lc
targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 >/dev/null
loopback_lun /backstores/user:lc/disk0 >/dev/null
dev=$(lun_dev lc)
echo "lc LUN is $dev"
grep -H . /sys/kernel/config/target/core/user_*/disk0/attrib/hw_max_sectors
scsi_checks "$dev" loopback

step "EXTENDED COPY (sg_xcopy): within disk0, and from disk0 to disk1, another LUN of the daemon"
targetcli /backstores/user:lc create name=disk1 size=64M cfgstring=disk1 >/dev/null
wwn=$(ls /sys/kernel/config/target/loopback | grep naa | head -1)
add_lun "$wwn" /backstores/user:lc/disk1
dev1=""
for _ in $(seq 100); do # LUN 1 of the loopback target
    dev1=$(lsscsi | awk '$1 ~ /:1]$/ && $3 == "LIO-ORG" && $4 == "lc" {print $NF}' | head -1)
    [ -n "$dev1" ] && [ -b "$dev1" ] && break
    sleep 0.2
done
[ -b "$dev1" ] || { lsscsi; fail "disk1's /dev/sdX not found"; }
echo "disk1 is $dev1"
# Adding LUN 1 queued UNIT ATTENTION / REPORTED LUNS DATA HAS CHANGED (LIO's) for LUN 0.
sg_turs "$dev" >/dev/null 2>&1 || true
sg_turs "$dev1" >/dev/null 2>&1 || true
sg_vpd -p tpc "$dev" | tee /tmp/tpc.txt
grep -qi "General copy operations" /tmp/tpc.txt || fail "third-party copy VPD page"
pat /tmp/w.bin 64 77
sgr good "" -- -s 32768 -i /tmp/w.bin "$dev" 2a 00 $(be32 2000) 00 00 40 00
# sg_xcopy wants the SCSI generic nodes.
sg_of() {
    local g; g=$(ls "/sys/block/$(basename "$1")/device/scsi_generic/")
    [ -c "/dev/$g" ] || mknod "/dev/$g" c $(tr ':' ' ' <"/sys/class/scsi_generic/$g/dev")
    echo "/dev/$g"
}
sg0=$(sg_of "$dev")
sg1=$(sg_of "$dev1")
sg_xcopy if="$sg0" of="$sg0" bs=512 skip=2000 seek=3000 count=64 || fail "sg_xcopy within disk0"
sgr good "" -- -r 32768 -o /tmp/r.bin "$dev" 28 00 $(be32 3000) 00 00 40 00
cmp /tmp/r.bin /tmp/w.bin || fail "EXTENDED COPY within disk0: data"
sg_xcopy if="$sg0" of="$sg1" bs=512 skip=2000 seek=10 count=64 || fail "sg_xcopy disk0 -> disk1"
sgr good "" -- -r 32768 -o /tmp/r.bin "$dev1" 28 00 $(be32 10) 00 00 40 00
cmp /tmp/r.bin /tmp/w.bin || fail "EXTENDED COPY disk0 -> disk1: data"

step "ext4 with discard, fstrim, data intact"
mkfs.ext4 -q -F "$dev"
mkdir -p /mnt/t
mount "$dev" /mnt/t
for i in $(seq 1 30); do head -c $((i * 40000)) /dev/urandom >/mnt/t/f$i; done
sync
rm /mnt/t/f1[0-9]
(cd /mnt/t && sha256sum f* | sort -k2) >/tmp/sums
fstrim -v /mnt/t | tee /tmp/trim.txt
grep -q "bytes were trimmed\|trimmed" /tmp/trim.txt || fail "fstrim"
umount /mnt/t
fsck.ext4 -f -n "$dev" || fail "fsck.ext4 after fstrim"
mount "$dev" /mnt/t
(cd /mnt/t && sha256sum -c --quiet /tmp/sums) || fail "ext4 checksums after fstrim"
umount /mnt/t

step "iSCSI: the same backstore over 127.0.0.1"
iqn=iqn.2026-11.org.lc:scsi
targetcli /iscsi create "$iqn" >/dev/null
targetcli "/iscsi/$iqn/tpg1/luns" create /backstores/user:lc/disk0 >/dev/null
targetcli "/iscsi/$iqn/tpg1" set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1 >/dev/null
targetcli "/iscsi/$iqn/tpg1/portals" delete 0.0.0.0 3260 >/dev/null 2>&1 || true
targetcli "/iscsi/$iqn/tpg1/portals" create 127.0.0.1 3260 >/dev/null
mkdir -p /run/lock/iscsi
pgrep iscsid >/dev/null || iscsid
sleep 1
iscsiadm -m discovery -t sendtargets -p 127.0.0.1 >/dev/null
iscsiadm -m node -T "$iqn" -p 127.0.0.1 --login
sleep 2
idev=$(lsscsi -t | awk -v t="$iqn" 'index($0, t) {print $NF}' | head -1)
[ -b "$idev" ] || { lsscsi -t; fail "iSCSI disk not found"; }
echo "iSCSI LUN is $idev"
scsi_checks "$idev" iSCSI

# Reservations are LIO's: for user backstores the core emulates PERSISTENT RESERVE
# IN/OUT and RESERVE/RELEASE and refuses conflicting commands before they reach lc.
step "persistent reservation: the iSCSI initiator holds Write Exclusive, loopback gets RESERVATION CONFLICT on writes"
pat /tmp/w.bin 1 99
# LIO records registrations under its dbroot (even without APTPL) and fails PR OUT
# with LOGICAL UNIT COMMUNICATION FAILURE (NOT READY) when the directory is missing.
mkdir -p "$(cat /sys/kernel/config/target/dbroot)/pr"
sg_persist --out --register --param-sark=0x1234 "$idev" || fail "PR register"
sg_persist --out --reserve --param-rk=0x1234 --prout-type=1 "$idev" || fail "PR reserve"
sg_persist --in --read-reservation "$dev" | tee /tmp/pr.txt
grep -qi "0x1234" /tmp/pr.txt || fail "loopback does not see the reservation"
sgr conflict "" -- -s 512 -i /tmp/w.bin "$dev" 2a 00 $(be32 700) 00 00 01 00
sgr good "" -- -r 512 -o /tmp/r.bin "$dev" 28 00 $(be32 700) 00 00 01 00
sgr good "" -- -s 512 -i /tmp/w.bin "$idev" 2a 00 $(be32 700) 00 00 01 00
sg_persist --out --release --param-rk=0x1234 --prout-type=1 "$idev" || fail "PR release"
sg_persist --out --register --param-rk=0x1234 --param-sark=0 "$idev" || fail "PR unregister"
sgr good "" -- -s 512 -i /tmp/w.bin "$dev" 2a 00 $(be32 700) 00 00 01 00
iscsiadm -m node -T "$iqn" -p 127.0.0.1 --logout
lc stats c0 | head -20
echo "lc-scsi ok"
