#!/bin/sh
# A 4 KiB writer and a 1 MiB writer at once (libaio, O_DIRECT, crc32c
# verify), each on its own half of the first 96 MiB and its own CPU (so
# its own virtqueue), while the host kills and restarts ringblk; fio must
# see no error and verify must pass. The last 32 MiB are left alone (the
# host checks them). The host starts its kill cycle when it reads
# RESTART-FIO-START.
set -e
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || { echo "expected 2 queues"; exit 1; }
echo RESTART-FIO-START
# Runs of a few seconds each under TCG, enough of them (about 40 s in all)
# for the host's five restarts, which take up to 20 s with QEMU's
# reconnects; each run verifies what it wrote.
for seed in 1 2 3 4 5 6 7 8 9 10 11 12; do
  fio --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite \
      --randseed=$seed --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --group_reporting \
      --name=small --bs=4k --iodepth=16 --offset=0 --size=48M --io_size=24M \
      --cpus_allowed=0 \
      --name=large --bs=1M --iodepth=4 --offset=48M --size=48M \
      --cpus_allowed=1
done
echo RESTART-FIO-DONE
