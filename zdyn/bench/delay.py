"""A userspace TCP delay shim: what ``tc qdisc ... netem delay`` would do, for kernels without netem.

    python -m zdyn.bench.delay --listen 127.0.0.1:6555 --target 127.0.0.1:5555 --delay-file /tmp/rtt_ms

Every connection to ``--listen`` is forwarded to ``--target``; each chunk read in either direction is written
on after half the round-trip time (``--rtt-ms``, or the number in ``--delay-file``, re-read once a second so a
benchmark can change it without breaking connections). Order is kept and nothing is throttled: it adds
latency, not a bandwidth limit. Peers that dial the shim instead of the target see a link with that RTT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)
CHUNK = 1 << 16
MAX_BUFFERED = 256  # chunks in flight per direction before reading pauses (a bound, as any queue has)


class Delay:
    """The shim's one-way delay, from a fixed RTT or a file holding the RTT in milliseconds."""

    def __init__(self, rtt_ms: float = 0.0, path: Path | None = None) -> None:
        self.rtt_ms = rtt_ms
        self.path = path
        self._mtime = 0.0

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0

    def refresh(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError, ValueError):
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._mtime = mtime
                self.rtt_ms = float(self.path.read_text().strip() or 0)
                log.info("RTT now %.1f ms", self.rtt_ms)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay.one_way_s`` after it was read, in order."""
    chunks: deque[tuple[float, bytes]] = deque()
    arrived = asyncio.Event()
    room = asyncio.Event()
    room.set()
    done = False

    async def read() -> None:
        nonlocal done
        while data := await reader.read(CHUNK):
            chunks.append((time.monotonic() + delay.one_way_s, data))
            arrived.set()
            if len(chunks) >= MAX_BUFFERED:
                room.clear()
                await room.wait()
        done = True
        arrived.set()

    reading = asyncio.get_running_loop().create_task(read())
    try:
        while True:
            if not chunks:
                if done:
                    break
                arrived.clear()
                await arrived.wait()
                continue
            due, data = chunks[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            chunks.popleft()
            room.set()
            writer.write(data)
            await writer.drain()
    finally:
        reading.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: Delay, stop: asyncio.Event) -> None:
    """Forward connections until ``stop`` is set; then close every connection it still holds."""
    open_writers: set[asyncio.StreamWriter] = set()

    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        open_writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            open_writers.discard(client_w)
            return
        open_writers.add(server_w)
        try:
            await asyncio.gather(pump(client_r, server_w, delay), pump(server_r, client_w, delay))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()
                open_writers.discard(writer)

    server = await asyncio.start_server(connection, *listen)
    log.info("delay shim %s:%d -> %s:%d, RTT %.1f ms", *listen, *target, delay.rtt_ms)
    async with server:
        while not stop.is_set():
            delay.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    for writer in list(open_writers):
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zdyn.bench.delay", description=__doc__)
    parser.add_argument("--listen", required=True, type=_address, help="HOST:PORT peers dial")
    parser.add_argument("--target", required=True, type=_address, help="HOST:PORT of the real service")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="added round-trip time")
    parser.add_argument("--delay-file", type=Path, help="file with the added RTT in ms (re-read when it changes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.listen, args.target, Delay(args.rtt_ms, args.delay_file), stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
