"""Reference broadcast server on the `websockets` library (asyncio), the canonical pattern of its docs.

Every message a client sends is broadcast to every connected client (the sender included), with
``websockets.asyncio.server.broadcast``: it writes the same frame to each connection at once, with no
backpressure. Compression is off so that the comparison with Chorus (which never compresses short
frames) is about the server, not zlib. The bench starts it as
``python -m bench.peers.ws_broadcast --port 0`` and reads the port from the first stdout line.
"""
from __future__ import annotations

import argparse
import asyncio

from websockets.asyncio.server import broadcast, serve

CONNECTIONS = set()


async def handler(websocket):
    CONNECTIONS.add(websocket)
    try:
        async for message in websocket:
            broadcast(CONNECTIONS, message)
    finally:
        CONNECTIONS.remove(websocket)


async def main(host: str, port: int, ping_interval_s: float) -> None:
    # backlog: asyncio's default of 100 would make 10,000 clients connecting at once wait on SYN retries.
    async with serve(handler, host, port, compression=None, ping_interval=ping_interval_s,
                     backlog=4096) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"websockets broadcast listening on {host}:{port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ping-interval-s", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port, args.ping_interval_s))
