#!/bin/sh
# fio writes and verifies all of /dev/vda, over and over, from two CPUs,
# while the host snapshots the disk and later commits the overlay back into
# its base. Each pass prints RB-ITER-n-START and RB-ITER-n-DONE so the host
# can time its steps; when it is done it types a line on the console, and
# the guest stops after the pass under way and prints the disk's md5.
set -e
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || { echo "expected 2 queues"; exit 1; }
size=$(($(cat /sys/block/vda/size) * 512))
half=$((size / 2))
(
  i=0
  while [ ! -e /tmp/stop ]; do
    i=$((i + 1))
    echo "RB-ITER-$i-START"
    if ! fio --name=snap$i --filename=/dev/vda --ioengine=libaio --direct=1 \
        --rw=randwrite --bssplit=4k/50:16k/30:64k/20 --iodepth=16 \
        --numjobs=2 --size=$half --offset_increment=$half \
        --cpus_allowed=0-1 --cpus_allowed_policy=split --randseed=$i \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting \
        > /tmp/fio.out 2>&1; then
      cat /tmp/fio.out
      echo "RB-FIO-FAILED in pass $i"
      exit 1
    fi
    grep -E "WRITE:|READ:" /tmp/fio.out || true
    # The longest request of the pass: the pause a switch cost the guest.
    grep -E "^ +lat \(" /tmp/fio.out | sed "s/^ */pass $i /" || true
    echo "RB-ITER-$i-DONE"
  done
) &
loop=$!
# Wait for the host's word (or for the host to hear that fio failed).
read -r answer < /dev/ttyS0
echo "host said: $answer"
touch /tmp/stop
wait $loop
echo "RB-MD5 $(md5sum /dev/vda | cut -d ' ' -f 1)"
