"""Whether a shared member still serves the pool's model, asked while holding its slot.

add-backend refuses a member whose /v1/models does not list the pool's model; a member
may change model later. So a gateway that holds a slot of a member asks it again, at
most once a CHECK_INTERVAL_SECONDS: holding the slot means no request of anyone runs
there, so llama_cpp.server's global lock, which /v1/models takes, is free. A member that
no longer lists the model is set to state 'refused' with the reason in `problem`; the
table's trigger takes it out of every gateway's pool within a second.

A member that fails to answer is the probe's and the dispatcher's business, not this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aiohttp
import asyncpg

from proxy import store
from proxy.pool import Backend

log = logging.getLogger(__name__)

CHECK_INTERVAL_SECONDS = 60.0
CHECK_TIMEOUT_SECONDS = 5.0
MODELS_ROUTE = "/v1/models"


class ModelCheck:
    """Asks shared members for their models now and then; refuses one that changed."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        pool: asyncpg.Pool,
        model_name: str,
        interval: float = CHECK_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.pool = pool
        self.model_name = model_name
        self.interval = interval
        self.clock = clock
        self._checked_at: dict[int, float] = {}  # member id -> when last asked

    def is_due(self, backend: Backend) -> bool:
        """Whether this member should be asked before its next request."""
        if not self.model_name or backend.member_id is None:
            return False
        last = self._checked_at.get(backend.member_id)
        return last is None or self.clock() - last >= self.interval

    async def check(self, backend: Backend) -> str | None:
        """Ask the member (its slot held); the problem if it serves another model, else None."""
        assert backend.member_id is not None
        self._checked_at[backend.member_id] = self.clock()
        ids = await self._model_ids(backend)
        if ids is None or self.model_name in ids:
            return None
        problem = (
            f"serves {', '.join(sorted(ids)) or 'no model'}, not the pool's model "
            f"{self.model_name!r}; point it at that model, then enable-backend {backend.name}"
        )
        log.error("shared backend %s refused: %s", backend.label, problem)
        try:
            await self.pool.execute(
                "UPDATE llama_backends SET state = 'refused', problem = $2, changed_at = now() "
                "WHERE id = $1 AND state = 'active'",
                backend.member_id,
                problem,
            )
        except store.UNAVAILABLE_ERRORS as error:
            log.warning("could not mark %s refused (%s)", backend.label, type(error).__name__)
        return problem

    async def _model_ids(self, backend: Backend) -> set[str] | None:
        try:
            async with self.session.get(
                backend.url + MODELS_ROUTE,
                headers={"Authorization": backend.authorization},
                timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT_SECONDS),
            ) as answer:
                if answer.status != 200:
                    return None
                listed = await answer.json(content_type=None)
            return {str(model["id"]) for model in listed["data"]}
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as error:
            log.info("could not ask %s for its models (%r); asking later", backend.label, error)
            return None
