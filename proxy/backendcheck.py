"""What the admin asks a backend before and while it is a member: its model, and whether it is up.

add-backend calls check_member before it writes anything: the member must answer
GET /v1/models with its key and list the pool's model. list-backends calls is_up, which
asks GET /openapi.json: llama_cpp.server answers it without a key and without its global
lock, so the probe neither needs the key nor waits behind a running request.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import PurePosixPath

import aiohttp

from proxy.backendstore import BackendError

CHECK_TIMEOUT_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 1.0
PROBE_PATH = "/openapi.json"


class MemberUnreachable(BackendError):
    """The backend did not answer: down, wrong URL, a firewall, or busy past the timeout."""


class MemberRefused(BackendError):
    """The backend answered, but cannot be a member: a wrong key or another model."""


def serves_model(model_ids: list[str], model_name: str) -> str | None:
    """The id among model_ids that names model_name, or None.

    llama_cpp.server without an alias names its model by the file's path, so an id whose
    last path component is model_name counts too.
    """
    for model_id in model_ids:
        if model_id == model_name or PurePosixPath(model_id).name == model_name:
            return model_id
    return None


async def fetch_model_ids(url: str, key: str, timeout: float = CHECK_TIMEOUT_SECONDS) -> list[str]:
    """The model ids of GET url/v1/models, asked with the key; a BackendError otherwise."""
    models_url = f"{url}/v1/models"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(models_url, headers=headers) as answer,
        ):
            body = await answer.read()
            status = answer.status
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        reason = f"no answer within {timeout:g} s" if isinstance(error, TimeoutError) else error
        raise MemberUnreachable(
            f"cannot reach {models_url} ({reason}): is the backend running and listening "
            f"on an address this host can reach (LLAMA_SERVER_HOST on the backend's host)? "
            f"A llama_cpp.server busy with a long request answers only once it is done"
        ) from None
    if status in (401, 403):
        raise MemberRefused(
            f"{models_url} refused the key (HTTP {status}): give the backend's own key, "
            f"LLAMA_API_KEY in runtime/config.env on its host"
        )
    if status != 200:
        raise MemberRefused(f"{models_url} answered HTTP {status}, not a list of models")
    try:
        return [str(model["id"]) for model in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        raise MemberRefused(
            f"{models_url} did not answer an OpenAI-style model list: is it an "
            f"OpenAI-compatible server (llama_cpp.server, llama-server, vLLM)?"
        ) from None


async def check_member(url: str, key: str, model_name: str) -> str:
    """The id under which the backend at url serves model_name; a BackendError if it does not."""
    model_ids = await fetch_model_ids(url, key)
    model_id = serves_model(model_ids, model_name)
    if model_id is None:
        served = ", ".join(repr(model_id) for model_id in model_ids) or "no model"
        raise MemberRefused(
            f"{url} serves {served}, not the pool's model {model_name!r}: every member must "
            f"serve the same model; start it with that model (or LLAMA_MODEL_ALIAS={model_name})"
        )
    return model_id


async def is_up(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether anything answers HTTP at url (any status: a server that lacks the page is up)."""
    try:
        async with session.get(f"{url}{PROBE_PATH}") as answer:
            await answer.read()
            return True
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def probe_all(urls: list[str], timeout: float = PROBE_TIMEOUT_SECONDS) -> dict[str, bool]:
    """is_up for every URL at once, so that a list of dead hosts costs one timeout."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        answers = await asyncio.gather(*(is_up(session, url) for url in urls))
    return dict(zip(urls, answers, strict=True))
