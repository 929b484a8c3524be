#!/usr/bin/env python3
"""Write the committed seed inputs under fuzz/corpus/<target>/seed-*.

virtio_blk_request: chains shaped like the ones QEMU's and Linux's
virtio-blk drivers and libblkio build (header, data, status descriptors;
indirect tables; data+status sharing a descriptor), in the target's
layout: 3 parameter bytes, then guest memory from address 0 (desc table
at 0). qmp_input: sessions like a QMP client's.   Run from the repo root.
"""
import os
import struct

OUT = "fuzz/corpus"
NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def put(mem, at, data):
    if len(mem) < at + len(data):
        mem.extend(b"\0" * (at + len(data) - len(mem)))
    mem[at:at + len(data)] = data


def desc(mem, table, i, addr, length, flags, nxt=0):
    put(mem, table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def header(mem, at, kind, sector):
    put(mem, at, struct.pack("<IIQ", kind, 0, sector))


def chain(mem, table, parts, first=0):
    """parts: (addr, len, flags) in order from entry `first`; NEXT links added."""
    for i, (a, n, f) in enumerate(parts, first):
        last = i == first + len(parts) - 1
        desc(mem, table, i, a, n, f | (0 if last else NEXT), 0 if last else i + 1)


def seed(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def blk(name, build, indirect=True, block4k=False, qlog=7, head=0):
    mem = bytearray()
    build(mem)
    flags = (1 if indirect else 0) | (2 if block4k else 0) | ((qlog - 1) << 2)
    seed("virtio_blk_request", name, bytes([flags]) + struct.pack("<H", head) + bytes(mem))


def read4k(m):
    header(m, 0x1000, T_IN, 8)
    chain(m, 0, [(0x1000, 16, 0), (0x2000, 4096, WRITE), (0x3000, 1, WRITE)])


def write2(m):
    header(m, 0x1000, T_OUT, 16)
    put(m, 0x2000, b"\xaa" * 512)
    chain(m, 0, [(0x1000, 16, 0), (0x2000, 512, 0), (0x2400, 1024, 0), (0x3000, 1, WRITE)])


def indirect_read(m):
    # libblkio / Linux with more segments than fit: one indirect descriptor;
    # a data buffer spans the two adjacent memory regions.
    header(m, 0x1000, T_IN, 0)
    desc(m, 0, 0, 0x800, 16 * 4, INDIRECT)
    chain(m, 0x800, [(0x1000, 16, 0), (0x2000, 512, WRITE), (0x3e00, 0x400, WRITE), (0x3000, 1, WRITE)])


def flush(m):
    header(m, 0x1000, T_FLUSH, 0)
    chain(m, 0, [(0x1000, 16, 0), (0x3000, 1, WRITE)])


def get_id(m):
    header(m, 0x1000, T_GET_ID, 0)
    chain(m, 0, [(0x1000, 16, 0), (0x2000, 20, WRITE), (0x3000, 1, WRITE)])


def segment(kind, flags):
    def build(m):
        header(m, 0x1000, kind, 0)
        put(m, 0x2000, struct.pack("<QII", 8, 8, flags))
        chain(m, 0, [(0x1000, 16, 0), (0x2000, 16, 0), (0x3000, 1, WRITE)])
    return build


def far_region(m):
    # Data in the separate region at 0x10000 (the image's third region
    # starts right after the first two, 0x8000 bytes in).
    header(m, 0x1000, T_OUT, 0)
    chain(m, 0, [(0x1000, 16, 0), (0x10000, 512, 0), (0x3000, 1, WRITE)])
    put(m, 0x8000, b"\x55" * 512)


def shared_descs(m):
    # Header and data in one descriptor; data and status in another.
    header(m, 0x1000, T_OUT, 0)
    chain(m, 0, [(0x1000, 16 + 512, 0), (0x3000, 1, WRITE)])
    header(m, 0x5000, T_IN, 0)
    chain(m, 0, [(0x5000, 16, 0), (0x6000, 4096 + 1, WRITE)], first=0x10)


def long_indirect(m):
    # More descriptors than seg_max + 2 (256 for a 256-entry queue): refused.
    header(m, 0x2000, T_IN, 0)
    n = 300
    desc(m, 0, 0, 0x800, 16 * n, INDIRECT)
    chain(m, 0x800, [(0x2000, 16, 0)] + [(0x3000, 512, WRITE)] * (n - 2) + [(0x2800, 1, WRITE)])


def wrong_direction(m):
    # A read whose data buffer is device-readable: refused.
    header(m, 0x1000, T_IN, 0)
    chain(m, 0, [(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, WRITE)])


# Seeds named bad-* are requests the device must refuse.
blk("bad-long-indirect", long_indirect, qlog=8)
blk("bad-wrong-direction", wrong_direction)
blk("read-4k", read4k)
blk("write-2seg", write2, indirect=False)
blk("indirect-read", indirect_read)
blk("flush", flush)
blk("get-id", get_id)
blk("discard", segment(T_DISCARD, 0))
blk("write-zeroes-unmap", segment(T_WRITE_ZEROES, 1))
blk("far-region", far_region)
blk("shared-descs", shared_descs)
blk("shared-descs-in", shared_descs, head=0x10)
blk("read-4k-blocks", read4k, block4k=True, qlog=8)

CAPS = b'{"execute":"qmp_capabilities"}\n'
qmp = {
    "commands": CAPS + b'{"execute":"query-commands","id":1}\n{"execute":"query-version"}',
    "queries": CAPS + b'{"execute":"query-block-exports"}{"execute":"query-named-block-nodes"}'
    b'{"execute":"query-blockstats","id":"x"}',
    "drained": CAPS + b'{"execute":"block-drained-begin","arguments":{"node-name":"null0"}}'
    b'{"execute":"block-drained-end","arguments":{"node-name":"null0"},"id":[1]}',
    "drain": CAPS + b'{"execute":"block-drain","arguments":{"node-name":"null0"}}'
    b'{"execute":"block-drain","arguments":{"export":"vda"}}',
    "resize": CAPS + b'{"execute":"block_resize","arguments":{"node-name":"null0","size":2097152}}'
    b'{"execute":"block_resize","arguments":{"node-name":"null0","size":"1G"}}',
    "garbage": b'foo {"execute": 1} [1,2] {"arguments":{}} {"execute":"quit","bogus":0}',
    "caps-enable": b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}' + CAPS,
    "unclosed": CAPS + b'{"execute":"quit","arguments":{"a":"}\\"{"}',
}
for name, text in qmp.items():
    seed("qmp_input", name, b"\x00" + text)
seed("qmp_input", "negotiated", b"\x01" + b'{"execute":"block_resize","arguments":{"export":"vda","node-name":"x"}}')
