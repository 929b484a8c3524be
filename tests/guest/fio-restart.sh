#!/bin/sh
# Random writes with crc32c verify from two CPUs (both virtqueues) while the
# host kills and restarts ringblk; fio must see no error and verify must
# pass. The host starts its kill cycle when it reads RESTART-FIO-START.
set -e
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || { echo "expected 2 queues"; exit 1; }
echo RESTART-FIO-START
# Six runs (about 40 s of I/O under TCG, enough for the host's five
# restarts), each verifying what it wrote.
for seed in 1 2 3 4 5 6; do
  fio --name=restart --filename=/dev/vda --ioengine=libaio --direct=1 \
      --rw=randwrite --bssplit=4k/50:16k/30:64k/20 --iodepth=16 \
      --numjobs=2 --size=48M --offset_increment=48M --randseed=$seed \
      --cpus_allowed=0-1 --cpus_allowed_policy=split \
      --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting
done
echo RESTART-FIO-DONE
