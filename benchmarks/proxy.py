"""A TCP proxy that delays what the server sends: a service one round trip further away.

The kernel here has no netem, so latency is added in user space. The delay is
added in one direction only (server to client): asyncio's timers round to about
a millisecond, so one delay per round trip keeps the added time close to the
one asked for. ``measured_rtt_ms`` PINGs a Redis through the proxy to report the
round trip it really gives.

    python -m benchmarks.proxy --listen 16379 --to 127.0.0.1:6379 --delay-ms 1

``pause``/``resume`` (in-process use) stop forwarding without closing anything:
a server that stops answering.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import threading
import time


class DelayProxy:
    """Forwards ``127.0.0.1:port`` to ``target``, delaying the server's bytes by ``delay_s``."""

    def __init__(self, target: tuple[str, int], delay_s: float, port: int = 0) -> None:
        self.target = target
        self.delay_s = delay_s
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="delay-proxy")
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> DelayProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def pause(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, server_writer}
        upstream = asyncio.ensure_future(self._pipe(client_reader, server_writer, 0.0))
        downstream = asyncio.ensure_future(
            self._pipe(server_reader, client_writer, self.delay_s))
        await asyncio.wait([upstream, downstream], return_when=asyncio.FIRST_COMPLETED)
        for pipe in (upstream, downstream):
            pipe.cancel()
        for writer in (client_writer, server_writer):
            writer.close()
            self._writers.discard(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    delay_s: float) -> None:
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while chunk := await reader.read(65536):
                await self._flowing.wait()
                chunks.put_nowait((time.monotonic() + delay_s, chunk))
            while not chunks.empty():
                await asyncio.sleep(delay_s or 0.001)
        finally:
            sender.cancel()


def measured_rtt_ms(port: int, pings: int = 50) -> float:
    """The median round trip of a Redis PING through ``127.0.0.1:port``, in ms."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        times = []
        for _ in range(pings):
            start = time.perf_counter()
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                reply += sock.recv(64)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--to", required=True, help="host:port")
    parser.add_argument("--delay-ms", type=float, required=True)
    options = parser.parse_args()
    host, port = options.to.rsplit(":", 1)
    proxy = DelayProxy((host, int(port)), options.delay_ms / 1000, options.listen).start()
    print(f"proxy 127.0.0.1:{proxy.port} -> {options.to} (+{options.delay_ms} ms)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    proxy.stop()


if __name__ == "__main__":
    main()
