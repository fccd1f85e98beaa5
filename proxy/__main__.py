"""`python -m proxy`: run the gateway until SIGTERM, then drain and flush the request log."""

from __future__ import annotations

import gc
import logging
import sys

from aiohttp import web

from proxy.app import make_app
from proxy.config import ProxyConfigError, load_config
from proxy.server import server_options
from proxy.store import StoreError

# Container allocations, less deallocations, between two young collections (CPython's
# default is 700). A request leaves next to no cyclic garbage, yet at the default a
# young collection ran every ~50 requests and a middle one every ~600, each pausing
# whichever request was in flight (0.5-0.75 and 1-1.5 ms on the 2-core box): the
# added p99.
# Raised, young collections run a few times a minute, and each still only walks the
# objects alive at that moment, so it costs no more; cyclic garbage (an exception's
# frames, say) waits a little longer to be freed, a few MB at most.
YOUNG_GC_THRESHOLD = 20_000


async def freeze_startup_heap(app: web.Application) -> None:
    """Exempt what import and startup built from garbage collection, which never frees it,
    and collect the young generation less often (YOUNG_GC_THRESHOLD).

    A full collection walks every object; with these out of the way it takes a few
    milliseconds instead of tens, so it cannot hold up the event loop (and /healthz)
    while a replay of the spool churns through rows.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    try:
        config = load_config()
    except ProxyConfigError as error:
        print(f"gateway: error: {error}", file=sys.stderr)
        return 2
    try:
        # SIGTERM/SIGINT: stop listening, let requests in flight finish for up to
        # drain_seconds, then run the cleanup contexts (which flush the request log).
        app = make_app(config)
        app.on_startup.append(freeze_startup_heap)  # after the resources' cleanup contexts
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            **server_options(config),
            print=lambda message: logging.getLogger("proxy").info("%s", message),
        )
    except StoreError as error:
        print(f"gateway: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(
            f"gateway: error: cannot listen on {config.host}:{config.port} ({error.strerror}); "
            f"stop what uses it or set LLAMA_PROXY_PORT",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
