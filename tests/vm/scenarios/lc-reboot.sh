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
metrics_listen = "127.0.0.1:9477"
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
step "reload (SIGHUP, what systemctl reload does) adds LUN disk8 while fio runs on disk9"
truncate -s 64M "$state/backing8.img"
fio --name=busy --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite \
    --offset=64M --size=64M --runtime=15 --time_based --output-format=terse >/tmp/busy.out 2>&1 &
busy=$!
sleep 2
cat >>/etc/lc/lc.toml <<TOML
[[lun]]
name = "disk8"
cache = "c9"
backing = "$state/backing8.img"
backing_id = 1
TOML
cp /etc/lc/lc.toml "$state/lc.toml"
kill -HUP "$(cat /tmp/lc.pid)"
for _ in $(seq 50); do grep -q "configuration reloaded" /tmp/lc.log && break; sleep 0.2; done
grep "configuration reloaded" /tmp/lc.log || fail "no reload after SIGHUP"
targetcli /backstores/user:lc create name=disk8 size=64M cfgstring=disk8 >/dev/null || fail "disk8 refused"
wwn=$(ls /sys/kernel/config/target/loopback | grep naa | head -1)
add_lun "$wwn" /backstores/user:lc/disk8
dev8=$(lun_dev lc "$dev")
fio_verify "$dev8" 8M
wait "$busy" || { cat /tmp/busy.out; fail "fio on disk9 saw errors across the reload"; }
step "metrics scraped over HTTP (metrics_listen) and with lc stats --prometheus"
python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9477/metrics", timeout=10).read().decode())' >/tmp/metrics.txt \
    || fail "metrics scrape"
grep -E '^lc_line_accesses_total\{cache="c9",lun="disk9",op="write"' /tmp/metrics.txt | head -3
grep -q 'lc_hit_ratio{cache="c9",lun="disk8",op="read"}' /tmp/metrics.txt || { cat /tmp/metrics.txt; fail "no hit ratio for disk8"; }
lc stats --prometheus | grep -q '^lc_dirty_lines{cache="c9",lun="disk9"}' || fail "lc stats --prometheus"
step "targetcli saveconfig, then a clean stop of lc"
targetcli saveconfig savefile="$state/saveconfig.json" >/dev/null || fail "saveconfig"
grep -q '"plugin": "user"' "$state/saveconfig.json" || fail "saveconfig has no user: backstore"
stop_lc
touch "$state/boot1.done"
echo "lc-reboot ok"
