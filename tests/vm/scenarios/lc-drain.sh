# Scenario 5: fill the cache with dirty data, lc drain, read the backing device alone
# with lc stopped and compare; the LUN deletes cleanly.
source /payload/scenarios/lib.sh
lc format -y --force /dev/vdb
cat >/etc/lc/lc.toml <<TOML
[daemon]
control_socket = "/run/lc/control.sock"
[[cache]]
name = "c0"
device = "/dev/vdb"
[cache.tunables]
writeback_enabled = false
[[lun]]
name = "disk0"
cache = "c0"
backing = "/dev/vdc"
backing_id = 0
TOML
start_lc
targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 >/dev/null
wwn=$(loopback_lun /backstores/user:lc/disk0)
dev=$(lun_dev lc)
step "dirty data"
head -c 200M /dev/urandom >/tmp/data
dd if=/tmp/data of="$dev" bs=1M oflag=direct conv=fsync status=none
lc status
step "drain"
lc drain disk0
lc status --json | grep -q '"dirty_lines":0' || fail "dirty lines left after drain"
step "delete the LUN and the backstore"
targetcli "/loopback/$wwn/luns" delete lun0 >/dev/null
targetcli /loopback delete "$wwn" >/dev/null
targetcli /backstores/user:lc delete disk0 >/dev/null
stop_lc
step "the backing device alone holds the data"
cmp -n $((200 << 20)) /tmp/data /dev/vdc || fail "backing device differs after drain"
echo "lc-drain ok"
