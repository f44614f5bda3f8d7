"""The userspace delay shim: bytes arrive intact, in order, one RTT later, and the RTT can change while running."""

import asyncio
import time

from zdyn.bench.delay import Delay, serve


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_the_shim_adds_its_rtt_and_keeps_the_bytes(unused_tcp_port_factory, tmp_path):
    target_port, shim_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    echo = await asyncio.start_server(_echo, "127.0.0.1", target_port)
    rtt_file = tmp_path / "rtt"
    rtt_file.write_text("100")
    stop = asyncio.Event()
    shim = asyncio.create_task(serve(("127.0.0.1", shim_port), ("127.0.0.1", target_port), Delay(0, rtt_file), stop))
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", shim_port)

    async def round_trip(payload: bytes) -> float:
        started = time.monotonic()
        writer.write(payload)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
        return time.monotonic() - started

    payload = bytes(range(256)) * 4000  # 1 MB: several chunks, kept in order
    assert 0.1 <= await round_trip(payload) < 0.6
    rtt_file.write_text("0")
    await asyncio.sleep(1.3)  # re-read once a second
    assert await round_trip(b"x") < 0.05
    writer.close()
    await writer.wait_closed()
    stop.set()
    await asyncio.wait_for(shim, 5)
    echo.close()
    await echo.wait_closed()
