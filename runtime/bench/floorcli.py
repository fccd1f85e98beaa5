"""What the bench's floors share (runtime/bench/pipe.py, rawproxy.py, bareproxy.py): the
command line `python -m MODULE PORT TARGET_PORT`, and serving an asyncio protocol."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable


def parse_ports(prog: str, description: str) -> tuple[int, int]:
    """PORT and TARGET_PORT from the command line, both on 127.0.0.1."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    parser.add_argument("port", type=int, help="where it listens, on 127.0.0.1")
    parser.add_argument("target_port", type=int, help="where it forwards, on 127.0.0.1")
    args = parser.parse_args()
    return args.port, args.target_port


def serve_protocol(make_protocol: Callable[[], asyncio.Protocol], port: int) -> None:
    """Serve `make_protocol`'s connections on 127.0.0.1:port until stopped."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(make_protocol, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
