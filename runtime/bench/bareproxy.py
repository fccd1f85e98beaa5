"""A floor: `python -m runtime.bench.bareproxy PORT TARGET_PORT`, aiohttp and nothing else.

It forwards each POST to 127.0.0.1:TARGET_PORT with aiohttp's client and answers with
aiohttp's server: the same HTTP stack as the gateway, without anything the gateway adds
(auth, limits, queue, request log, metrics, failover). What it adds on a machine is the
part of the gateway's added latency and CPU that belongs to the stack, not to llamagate;
scenario 1 prints it next to the gateway's figures. Streams are not its business: the
bare TCP pipe (runtime/bench/pipe.py) is the floor for those.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from runtime.bench.floorcli import parse_ports

SESSION = web.AppKey("session", aiohttp.ClientSession)
TARGET = web.AppKey("target", str)


async def forward(request: web.Request) -> web.Response:
    body = await request.read()
    session, target = request.app[SESSION], request.app[TARGET]
    headers = {"Content-Type": request.content_type}
    async with session.post(target + request.path, data=body, headers=headers) as answer:
        return web.Response(
            body=await answer.read(), status=answer.status, content_type=answer.content_type
        )


async def client_session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession()
    yield
    await app[SESSION].close()


def make_app(target_port: int) -> web.Application:
    app = web.Application()
    app[TARGET] = f"http://127.0.0.1:{target_port}"
    app.cleanup_ctx.append(client_session)
    app.router.add_post("/{path:.*}", forward)
    return app


def main() -> None:
    port, target_port = parse_ports(
        "runtime.bench.bareproxy",
        "aiohttp's server and client forwarding POSTs: the bench's HTTP floor.",
    )
    web.run_app(make_app(target_port), host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
