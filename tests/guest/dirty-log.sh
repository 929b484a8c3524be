#!/bin/sh
# The dirty log's own test: pages that only the device writes, after QEMU
# has already copied them once.
# 1. Write a pattern over the first 64 MiB of the disk (O_DIRECT) and drop
#    the page cache; then churn (the CPU rewrites 32 MiB of tmpfs with
#    random data) so that the migration keeps iterating.
# 2. The host starts the migration and types "go" once QEMU has sent all of
#    guest RAM once. The churn stops and the guest reads the 64 MiB through
#    the page cache: the device fills pages the CPU never writes.
# 3. The host types a line on the destination once the migration completed;
#    the page cache must hold the pattern. A page the device filled on the
#    source without marking it in the dirty log reaches the destination with
#    what it held when QEMU first copied it.
set -e
# Held open to the end: the last close of a block device drops its page
# cache, and the check below must read the cache, not the disk.
exec 3< /dev/vda
sectors_read() { set -- $(cat /sys/block/vda/stat); echo "$3"; }
region="--filename=/dev/vda --ioengine=psync --bs=1M --offset=0 --size=64M --verify=pattern --verify_pattern=0x5a"
fio --name=fill $region --rw=write --direct=1 --do_verify=0 > /tmp/fill.out 2>&1 \
  || { cat /tmp/fill.out; exit 1; }
echo 3 > /proc/sys/vm/drop_caches
fio --name=churn --filename=/tmp/churn --ioengine=psync --rw=write --bs=1M \
  --size=32M --refill_buffers --time_based --runtime=3600 > /dev/null 2>&1 &
churn=$!
echo DIRTYLOG-ARMED
read -r answer < /dev/ttyS0
echo "host said: $answer"
kill $churn
wait $churn || true
dd if=/dev/vda of=/dev/null bs=1M count=64 2>/dev/null
echo DIRTYLOG-READ
read -r answer < /dev/ttyS0
echo "host said: $answer"
# Buffered, without invalidating the cache: what the device put there.
before=$(sectors_read)
ok=1
fio --name=cached $region --rw=read --direct=0 --invalidate=0 \
  --verify_fatal=1 > /tmp/cached.out 2>&1 || ok=0
after=$(sectors_read)
# (Some slack for metadata reads.)
if [ $((after - before)) -gt 2048 ]; then
  echo "RB-CACHE-UNUSED: the check read $((after - before)) sectors from the disk"
  exit 1
fi
if [ $ok = 1 ]; then
  echo "RB-CACHE-OK"
else
  grep -iE "verify|bad|error" /tmp/cached.out | head -n 5
  echo "RB-CACHE-STALE"
  exit 1
fi
