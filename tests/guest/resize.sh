#!/bin/sh
# The host grows the disk while we run (block_resize on the control
# socket): wait for the kernel to see the new size, without a reboot,
# then write and read back the new last sector.
old=$(cat /sys/block/vda/size)
echo "RESIZE-READY $old"
n=0
while [ "$(cat /sys/block/vda/size)" = "$old" ] && [ $n -lt 600 ]; do
  sleep 0.1
  n=$((n + 1))
done
new=$(cat /sys/block/vda/size)
echo "guest sees $new sectors (was $old)"
[ "$new" != "$old" ] || exit 1
last=$((new - 1))
printf 'ringblk-resize-%s' "$new" > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=512 seek=$last count=1 conv=sync,fsync 2>/dev/null || exit 1
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=512 skip=$last count=1 2>/dev/null || exit 1
head -c "$(wc -c < /tmp/pat)" /tmp/back | cmp - /tmp/pat || exit 1
echo "last sector $last written and read back"
