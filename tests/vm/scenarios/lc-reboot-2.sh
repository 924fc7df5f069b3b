# Boot 2 of 2: at boot lc starts first (lc.service is ordered before the targetcli
# restore service), then the saved LIO configuration is restored the way the restore
# service does it; the backstore is served again and the flushed data reads back.
source /payload/scenarios/lib.sh
state=/payload/reboot
[ -f "$state/boot1.done" ] || fail "boot 1 did not finish"
cp "$state/lc.toml" /etc/lc/lc.toml
start_lc
step "restore the saved configuration (as rtslib-fb-targetctl does at boot)"
timeout 120 targetctl restore "$state/saveconfig.json" || fail "restore failed or hung"
# grep reads all of it: with pipefail, `grep -q` quitting at the first match can
# fail the pipeline through targetcli's broken pipe (seen once, 2026-12-01).
targetcli ls /backstores/user:lc | grep disk9 >/dev/null || fail "disk9 not restored"
dev=$(lun_dev lc)
lc status
step "the data flushed before the reboot reads back"
got=$(dd if="$dev" bs=1M count=32 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[ "$got" = "$(cat "$state/data.sha")" ] || fail "data lost across the reboot"
stop_lc
targetcli clearconfig confirm=True >/dev/null 2>&1 || true
rm -rf "$state"
echo "lc-reboot-2 ok"
