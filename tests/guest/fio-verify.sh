#!/bin/sh
# Random writes of mixed sizes from two CPUs (so both virtqueues are used),
# each job on its own 48 MiB, then every block read back and checked.
set -e
echo "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues, serial '$(cat /sys/block/vda/serial)'"
# The serial the host set: `serve --serial ringblk-guest`, or the one
# qemu-storage-daemon's form gives every export (as QSD does).
case "$(cat /sys/block/vda/serial)" in
  ringblk-guest|vhost_user_blk) ;;
  *) echo "wrong serial"; exit 1 ;;
esac
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || { echo "expected 2 queues"; exit 1; }
fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 \
    --rw=randwrite --bssplit=4k/50:16k/30:64k/20 --iodepth=16 \
    --numjobs=2 --size=48M --offset_increment=48M \
    --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting
fio --name=flush --filename=/dev/vda --ioengine=sync --rw=write --bs=4k --size=1M --fsync=4
# Switch the guest to write-through (QEMU relays it as SET_CONFIG) and verify
# once more: every write is then flushed before it completes.
echo "write through" > /sys/block/vda/cache_type
[ "$(cat /sys/block/vda/cache_type)" = "write through" ] || { echo "write cache not switched"; exit 1; }
fio --name=wt --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=4 --size=4M --offset=100M --verify=crc32c --do_verify=1 --verify_fatal=1
