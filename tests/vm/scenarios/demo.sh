# The quick-start demo inside the guest: a file-backed cache and backing device, the
# daemon, a user:lc backstore and a loopback LUN, then a file system on it.
source /payload/scenarios/lib.sh
mkdir -p /var/lib/lc-demo
truncate -s 256M /var/lib/lc-demo/cache.img
truncate -s 1G /var/lib/lc-demo/hdd.img
lc format -y /var/lib/lc-demo/cache.img
cat >/etc/lc/lc.toml <<TOML
[daemon]
control_socket = "/run/lc/control.sock"
[[cache]]
name = "demo"
device = "/var/lib/lc-demo/cache.img"
[[lun]]
name = "disk0"
cache = "demo"
backing = "/var/lib/lc-demo/hdd.img"
backing_id = 0
TOML
start_lc
targetcli /backstores/user:lc create name=disk0 size=1G cfgstring=disk0 hw_max_sectors=2048
loopback_lun /backstores/user:lc/disk0 >/dev/null
dev=$(lun_dev lc)
echo "lc disk: $dev"
lsscsi
mkfs.ext4 -q -F "$dev" && mkdir -p /mnt/demo && mount "$dev" /mnt/demo
df -h /mnt/demo
umount /mnt/demo
lc status
