#!/bin/sh
# Live migration. While the host migrates the VM, from both CPUs:
# - fio randwrite with crc32c verify (verify_backlog: reads run all along)
#   on the first 96 MiB, O_DIRECT, pass after pass;
# - a reader, sweep after sweep: it writes a new pattern over the last
#   32 MiB (O_DIRECT), drops the page cache and reads the region back
#   through it, slowly.
# (fio's default invalidate=1 flushes the whole device's page cache,
# BLKFLSBUF, at each start: the randwrite passes must not.)
# The host types a line on the destination's console once the migration
# completed. The guest then stops both (the reader finishes its sweep);
# fio must have passed, and the page cache must hold the last sweep's
# pattern. The device filled those pages and the CPU never wrote them: a
# page the device wrote on the source without logging it in the dirty log
# reaches the destination with what it held before (an older pattern).
set -e
# Held open to the end: the last close of a block device drops its page
# cache, and the final check must read the cache, not the disk.
exec 3< /dev/vda
sectors_read() { set -- $(cat /sys/block/vda/stat); echo "$3"; }
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || { echo "expected 2 queues"; exit 1; }
region="--filename=/dev/vda --ioengine=psync --bs=1M --offset=96M --size=32M --verify=pattern"
(
  i=0
  while [ ! -e /tmp/stop ]; do
    i=$((i + 1))
    if ! fio --name=mig$i --filename=/dev/vda --ioengine=libaio --direct=1 \
        --invalidate=0 --rw=randwrite --bssplit=4k/50:16k/30:64k/20 --iodepth=16 \
        --numjobs=2 --size=48M --offset_increment=48M --randseed=$i \
        --cpus_allowed=0-1 --cpus_allowed_policy=split \
        --verify=crc32c --do_verify=1 --verify_backlog=16 --verify_fatal=1 \
        --group_reporting > /tmp/fio.out 2>&1; then
      cat /tmp/fio.out
      echo "RB-FIO-FAILED in pass $i"
      exit 1
    fi
    # The longest request of the pass (the pause a switch-over cost).
    grep -E "^ +lat \(" /tmp/fio.out | sed "s/^ */pass $i /" || true
    echo "RB-PASS-$i-DONE"
  done
) &
fio_loop=$!
(
  sweep=0
  while [ ! -e /tmp/stop ]; do
    sweep=$((sweep + 1))
    pat=$(printf '0x%02x' $((sweep % 250 + 1)))
    fio --name=fill $region --rw=write --direct=1 --verify_pattern=$pat \
        --do_verify=0 > /tmp/fill.out 2>&1 || { cat /tmp/fill.out; exit 1; }
    echo 3 > /proc/sys/vm/drop_caches
    echo $pat > /tmp/pattern
    k=96
    while [ $k -lt 128 ]; do
      dd if=/dev/vda of=/dev/null bs=1M skip=$k count=1 2>/dev/null
      sleep 0.02
      k=$((k + 1))
    done
  done
) &
reader=$!
echo MIGRATE-READY
read -r answer < /dev/ttyS0
echo "host said: $answer"
touch /tmp/stop
reader_ok=1
wait $reader || reader_ok=0
fio_ok=1
wait $fio_loop || fio_ok=0
# Buffered, without invalidating the cache: what the reader left there.
cache_ok=1
pat=$(cat /tmp/pattern)
echo "reader: last pattern $pat"
before=$(sectors_read)
if fio --name=cached $region --rw=read --direct=0 --invalidate=0 \
    --verify_pattern=$pat --verify_fatal=1 > /tmp/cached.out 2>&1; then
  after=$(sectors_read)
  # (Some slack for metadata reads.)
  [ $((after - before)) -le 2048 ] || {
    echo "RB-CACHE-UNUSED: the check read $((after - before)) sectors from the disk"
    exit 1
  }
  echo "RB-CACHE-OK"
else
  grep -iE "verify|bad|error" /tmp/cached.out | head -n 5
  echo "RB-CACHE-STALE"
  cache_ok=0
fi
[ $reader_ok = 1 ] || { echo "RB-READER-FAILED"; exit 1; }
[ $fio_ok = 1 ] || { echo "RB-FIO-FAILED"; exit 1; }
[ $cache_ok = 1 ] || exit 1
echo MIGRATE-FIO-DONE
