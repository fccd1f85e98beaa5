"""The admin CLI's backend commands: add-backend, list-backends, drain-backend,
enable-backend and remove-backend. proxy/admin.py puts them in its group.

They manage the shared members of the pool (llama_backends, proxy/backendstore.py): the
backends on other hosts that every gateway on this database uses. This host's own
replicas (LLAMA_PROXY_BACKEND_URL) are the console's, and list-backends only shows them.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import click

from proxy import backendstore
from proxy.adminsupport import (
    AdminEnv,
    echo_json,
    echo_table,
    iso,
    json_option,
    pass_env,
    run,
    when,
)
from proxy.backendcheck import check_member, probe_all
from proxy.backendstore import ACTIVE, DRAINING, BackendRow, BackendTaken, NewBackend
from proxy.clierrors import EXIT_BAD_INPUT, CliError
from proxy.configparse import parse_backend_urls
from proxy.sealing import seal

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,63}")
MAX_CONCURRENCY = 1024
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
NO_MODEL_NAME = (
    "the pool's model name is unknown, so the backend's model cannot be checked: run this "
    "through bin/user_management_cli.sh, or set LLAMA_PROXY_MODEL_NAME"
)
LIST_HEADERS = ("NAME", "URL", "STATE", "UP", "BUSY", "REQUESTS", "ERRORS", "LAST USED", "MODEL")


def name_option(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise CliError(
            f"invalid name {value!r}: use 1 to 63 letters, digits, '.', '-' or '_', such as gpu-b1",
            EXIT_BAD_INPUT,
        )
    return value


def checked_url(text: str) -> str:
    """The URL as LLAMA_PROXY_BACKEND_URL entries are checked, without a trailing slash."""
    try:
        if "," in text:
            raise ValueError("holds a comma; add one backend at a time")
        [url] = parse_backend_urls(text)
    except ValueError as error:
        raise CliError(f"invalid backend URL {text!r}: {error}", EXIT_BAD_INPUT) from None
    return url


def read_key(key_file: Path | None) -> str:
    """The backend's key from the file, or stdin (a prompt without echo on a terminal)."""
    if key_file is not None:
        try:
            key = key_file.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(
                f"cannot read the key file {key_file}: {error}", EXIT_BAD_INPUT
            ) from None
    elif sys.stdin.isatty():
        key = click.prompt("the backend's key (its LLAMA_API_KEY)", hide_input=True, err=True)
    else:
        key = sys.stdin.read()
    key = key.strip()
    if not key:
        raise CliError(
            "the backend's key is empty: give its LLAMA_API_KEY in --key-file F or on stdin",
            EXIT_BAD_INPUT,
        )
    return key


@click.command("add-backend")
@click.argument("url")
@click.option("--name", required=True, help="A short name for logs and metrics, e.g. gpu-b1.")
@click.option(
    "--concurrency",
    type=click.IntRange(1, MAX_CONCURRENCY),
    default=1,
    show_default=True,
    help="Requests it runs at once (llama-server --parallel N); one slot each.",
)
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file holding the backend's key. Without it the key is read from stdin.",
)
@pass_env
def add_backend(
    env: AdminEnv, url: str, name: str, concurrency: int, key_file: Path | None
) -> None:
    """Add a backend on another host to the pool that every gateway on this database shares.

    The key is the backend's own bearer key (LLAMA_API_KEY in runtime/config.env on its
    host). It is read from --key-file or stdin, never from the command line (where ps and
    the shell's history would show it), and stored sealed with LLAMA_PROXY_BACKEND_SECRET:
    the database alone cannot call the backend. Before anything is written the backend
    must answer GET URL/v1/models with that key and list the pool's model. Every gateway
    uses it within a second.

    \b
    Example:
        bin/user_management_cli.sh add-backend http://10.0.0.2:8000 --name gpu-b1 \\
            --concurrency 2 --key-file /root/gpu-b1.key
        ssh gpu-b1 grep LLAMA_API_KEY= llamagate/runtime/config.env | cut -d= -f2- \\
            | bin/user_management_cli.sh add-backend http://10.0.0.2:8000 --name gpu-b1
    """
    name, url = name_option(name), checked_url(url)
    if url in env.local_backends:
        raise CliError(
            f"{url} is one of this host's replicas (LLAMA_PROXY_BACKEND_URL): its gateway "
            f"uses it already; add a backend on another host",
            EXIT_BAD_INPUT,
        )
    if not env.model_name:
        raise CliError(NO_MODEL_NAME, EXIT_BAD_INPUT)
    key = read_key(key_file)
    sealed_key = seal(env.backend_secret, name, url, key)

    async def check_and_add(conn: asyncpg.Connection) -> str:
        taken = await backendstore.find_taken(conn, name, url)
        if taken:  # before the backend is asked: a taken name needs no network
            raise BackendTaken(taken)
        model = await check_member(url, key, env.model_name)
        new = NewBackend(name, url, concurrency, sealed_key, model)
        await backendstore.add_backend(conn, new)
        return model

    model = run(env, check_and_add)
    slots = f"{concurrency} slot{'s' if concurrency != 1 else ''}"
    click.echo(f"added backend {name!r}: {url}, {slots}, serving {model!r}")
    click.echo("every gateway on this database uses it within a second; list-backends shows it")
    if urlsplit(url).hostname in LOOPBACK_HOSTS:
        click.echo(
            f"note: {url} is a loopback address: gateways on other hosts cannot reach it",
            err=True,
        )


@click.command("list-backends")
@json_option
@pass_env
def list_backends(env: AdminEnv, as_json: bool) -> None:
    """List the pool: the shared backends, then this host's replicas (marked local).

    For each shared backend: its state (active takes requests, draining finishes what it
    runs and takes nothing new, refused was taken out by a gateway because it serves
    another model), busy slots of its concurrency (held by a live gateway), requests and
    errors so far, when a request last finished there, and its model. UP says whether it
    answers from this host now. This host's replicas belong to its gateway alone; their
    figures are in the gateway's /metrics.

    \b
    Example:
        bin/user_management_cli.sh list-backends
        bin/user_management_cli.sh list-backends --json
    """
    shared = run(env, backendstore.list_backends)
    urls = [row.url for row in shared] + list(env.local_backends)
    up = asyncio.run(probe_all(urls)) if urls else {}
    records = [shared_record(row, up[row.url]) for row in shared]
    records += [local_record(url, up[url]) for url in env.local_backends]
    if as_json:
        echo_json([{**record, "last_used": iso(record.get("last_used"))} for record in records])
    elif not records:
        click.echo("no backend: add one with add-backend, or start one here (./console.sh start)")
    else:
        echo_table(LIST_HEADERS, [table_row(record) for record in records])
        for record in records:
            if record["problem"]:
                click.echo(f"{record['name']}: {record['problem']}")


def shared_record(row: BackendRow, is_up: bool) -> dict[str, Any]:
    return {
        "name": row.name,
        "url": row.url,
        "local": False,
        "state": row.state,
        "up": is_up,
        "busy": row.busy,
        "concurrency": row.concurrency,
        "requests": row.requests,
        "errors": row.errors,
        "last_used": row.last_used,
        "model": row.model,
        "problem": row.problem,
    }


def local_record(url: str, is_up: bool) -> dict[str, Any]:
    # A local replica has no registry row: no state, slots or figures in the database.
    return {"name": "local", "url": url, "local": True, "up": is_up, "problem": ""}


def table_row(record: dict[str, Any]) -> list[Any]:
    up = "up" if record["up"] else "down"
    if record["local"]:
        return [record["name"], record["url"], "local", up, "-", "-", "-", "-", "-"]
    return [
        record["name"],
        record["url"],
        record["state"],
        up,
        f"{record['busy']}/{record['concurrency']}",
        record["requests"],
        record["errors"],
        when(record["last_used"]),
        record["model"],
    ]


@click.command("drain-backend")
@click.argument("name")
@pass_env
def drain_backend(env: AdminEnv, name: str) -> None:
    """Drain a shared backend: it finishes what it runs and takes nothing new.

    Requests already running there finish; new ones go to the other members. Use it
    before stopping or updating the backend's host; enable-backend brings it back.

    \b
    Example:
        bin/user_management_cli.sh drain-backend gpu-b1
    """
    change = run(env, lambda conn: backendstore.set_state(conn, name, DRAINING))
    click.echo(
        f"backend {name!r} is draining (was {change.before}): it finishes what it runs and "
        f"takes nothing new; enable-backend {name} brings it back"
    )


@click.command("enable-backend")
@click.argument("name")
@pass_env
def enable_backend(env: AdminEnv, name: str) -> None:
    """Let a drained or refused shared backend take requests again.

    A backend refused by a gateway (it served another model) is checked again by the
    gateways that use it: enable it only once it serves the pool's model.

    \b
    Example:
        bin/user_management_cli.sh enable-backend gpu-b1
    """
    change = run(env, lambda conn: backendstore.set_state(conn, name, ACTIVE))
    click.echo(f"backend {name!r} is active (was {change.before}): it takes new requests")


@click.command("remove-backend")
@click.argument("name")
@pass_env
def remove_backend(env: AdminEnv, name: str) -> None:
    """Remove a shared backend from the pool, with its slots and figures.

    Requests running on it finish; nothing new goes there. Its host keeps running:
    stop it there (./console.sh stop). To take it out for a while, drain-backend keeps
    its row and figures.

    \b
    Example:
        bin/user_management_cli.sh remove-backend gpu-b1
    """
    url = run(env, lambda conn: backendstore.remove_backend(conn, name))
    click.echo(f"removed backend {name!r} ({url}): requests running there finish, none start")


BACKEND_COMMANDS = (add_backend, list_backends, drain_backend, enable_backend, remove_backend)
