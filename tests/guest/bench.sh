#!/bin/sh
# scripts/bench --guest: fio in the guest against /dev/vda, 4 KiB random
# reads and writes at QD1 and QD32, each for rbsecs= seconds (kernel
# command line). Each result is one JSON document between markers.
secs=$(sed -n 's/.*rbsecs=\([0-9]*\).*/\1/p' /proc/cmdline)
for rw in randread randwrite; do
  for qd in 1 32; do
    echo "RB-BENCH-BEGIN $rw $qd"
    fio --name=g --filename=/dev/vda --ioengine=libaio --direct=1 --rw=$rw \
        --bs=4k --iodepth=$qd --size=512M --time_based --runtime=${secs:-10} \
        --ramp_time=1 --output-format=json || exit 1
    echo "RB-BENCH-END"
  done
done
