# Boot 1 of 2: LUNs persisted the targetcli way survive a reboot. A user:lc backstore
# and its loopback LUN are created, data is written and flushed, `targetcli
# saveconfig` saves the LIO configuration, lc stops cleanly (as systemd stops it at
# shutdown), and the guest goes on to power off normally. The cache and backing
# devices are files in the payload folder, which both boots share (the root image
# is a snapshot and the virtual disks belong to the other scenarios).
source /payload/scenarios/lib.sh
state=/payload/reboot
rm -rf "$state"; mkdir -p "$state"
truncate -s 128M "$state/cache.img"
truncate -s 256M "$state/backing.img"
lc format -y "$state/cache.img"
cat >"$state/lc.toml" <<TOML
[daemon]
control_socket = "/run/lc/control.sock"
[[cache]]
name = "c9"
device = "$state/cache.img"
[cache.tunables]
writeback_enabled = false
[[lun]]
name = "disk9"
cache = "c9"
backing = "$state/backing.img"
backing_id = 0
TOML
cp "$state/lc.toml" /etc/lc/lc.toml
start_lc
targetcli /backstores/user:lc create name=disk9 size=256M cfgstring=disk9 >/dev/null
loopback_lun /backstores/user:lc/disk9 >/dev/null
dev=$(lun_dev lc)
step "write 32 MiB and flush"
head -c 32M /dev/urandom >"$state/data"
dd if="$state/data" of="$dev" bs=1M oflag=direct conv=fsync status=none || fail "write"
sha256sum <"$state/data" | cut -d' ' -f1 >"$state/data.sha"
step "targetcli saveconfig, then a clean stop of lc"
targetcli saveconfig savefile="$state/saveconfig.json" >/dev/null || fail "saveconfig"
grep -q '"plugin": "user"' "$state/saveconfig.json" || fail "saveconfig has no user: backstore"
stop_lc
touch "$state/boot1.done"
echo "lc-reboot ok"
