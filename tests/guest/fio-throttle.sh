#!/bin/sh
# tests/throttle.rs: 4 KiB random reads at QD32 against a disk the host
# limits to a rate (a throttle group); after a 2 s ramp (the group's first
# tenth of a second passes at once), fio measures 10 s. fio's read IOPS on
# one line (terse output, field 8).
set -e
out=$(fio --name=throttle --filename=/dev/vda --ioengine=libaio --direct=1 \
    --rw=randread --bs=4k --iodepth=32 --size=512M --time_based --runtime=10 \
    --ramp_time=2 --minimal)
echo "RB-THROTTLE-IOPS $(echo "$out" | cut -d';' -f8)"
