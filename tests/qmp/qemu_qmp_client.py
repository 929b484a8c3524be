"""Drive ringblk's control socket with the qemu.qmp library (QMPClient and
the legacy sync API qmp-shell uses). Usage: qemu_qmp_client.py QMP_SOCKET.
Exits non-zero with a message on the first failed expectation."""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol


def expect(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")


async def main(sock):
    a = QMPClient("a")
    b = QMPClient("b")
    await a.connect(sock)
    await b.connect(sock)
    expect(a.greeting is not None, "greeting parsed")

    exports = await a.execute("query-block-exports")
    expect(exports[0]["id"] == "vda", f"export listed: {exports}")

    # Events reach the other client, with timestamps.
    with b.listener() as listener:
        r = await a.execute("block-drained-begin", {"export": "vda"})
        expect(r["quiesce-counter"] == 1, f"begin: {r}")
        ev = await asyncio.wait_for(listener.get(), 10)
        expect(ev["event"] == "BLOCK_DRAINED_BEGIN", f"event: {ev}")
        expect("seconds" in ev["timestamp"], f"timestamp: {ev}")
    r = await a.execute("block-drained-end", {"export": "vda"})
    expect(r["quiesce-counter"] == 0, f"end: {r}")

    # Errors surface as ExecuteError with QMP's class.
    try:
        await a.execute("block_resize", {"export": "vda", "size": 1})
        expect(False, "unaligned resize must fail")
    except ExecuteError as e:
        expect(e.error_class == "GenericError", f"class {e.error_class}")
    try:
        await a.execute("block-drain", {"export": "nope"})
        expect(False, "unknown export must fail")
    except ExecuteError as e:
        expect(e.error_class == "DeviceNotFound", f"class {e.error_class}")

    stats = await a.execute("query-blockstats")
    expect("rd_operations" in stats[0]["stats"], f"stats: {stats}")
    expect("latency" in stats[0]["x-stats"]["read"], f"stats: {stats}")
    await a.disconnect()
    await b.disconnect()


def legacy(sock):
    q = QEMUMonitorProtocol(sock)
    q.connect(negotiate=True)
    r = q.cmd("block-drain", export="vda")
    # This API returns the command's return value itself.
    expect(r.get("node-name") == "fmt0", f"legacy cmd: {r}")
    q.close()


asyncio.run(main(sys.argv[1]))
legacy(sys.argv[1])
print("qemu.qmp client: all checks passed")
