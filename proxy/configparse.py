"""How a configuration value's text becomes a value: one parser per kind of key.

Each raises ValueError with a reason that completes "invalid KEY='text' from SOURCE: ".
"""

from __future__ import annotations

import ipaddress
import shlex
from urllib.parse import urlsplit

BACKEND_SCHEMES = ("http", "https")


def parse_text(value: str) -> str:
    return value


def parse_whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("must be a whole number") from None


def parse_optional_int(value: str) -> int | None:
    return None if value == "" else parse_whole_number(value)


def parse_non_negative_int(value: str) -> int:
    number = parse_whole_number(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def parse_positive_int(value: str) -> int:
    number = parse_whole_number(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def parse_seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None


def parse_positive_float(value: str) -> float:
    number = parse_seconds(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def parse_non_negative_float(value: str) -> float:
    number = parse_seconds(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be 0 (fail closed) or a finite number of seconds")
    return number


def parse_port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return int(value)


def parse_optional_port(value: str) -> int | None:
    return None if value == "" else parse_port(value)


def parse_host(value: str) -> str:
    if value != "localhost":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("must be an IP address such as 127.0.0.1, or localhost") from None
    return value


def parse_flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 or 0")


def parse_dsn(value: str) -> str:
    if not value:
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError("must be a postgresql:// URL") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a postgresql:// URL")
    return value


def parse_args(value: str) -> tuple[str, ...]:
    return tuple(shlex.split(value))


def parse_backend_urls(value: str) -> tuple[str, ...]:
    """A comma-separated list of backend base URLs, one per backend, no repeats; empty for a
    gateway whose backends are all shared members (LLAMA_SERVER_REPLICAS=0)."""
    if not value.strip():
        return ()
    urls = tuple(item.strip().rstrip("/") for item in value.split(","))
    for url in urls:
        _check_backend_url(url)
    repeated = sorted({url for url in urls if urls.count(url) > 1})
    if repeated:
        raise ValueError(f"lists {repeated[0]} twice; name each backend once")
    return urls


def _check_backend_url(url: str) -> None:
    shape = "must be http:// URLs separated by commas, such as http://127.0.0.1:8000"
    if not url:
        raise ValueError(f"has an empty entry; {shape}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"{url!r} is not a URL; {shape}") from None
    if parts.scheme not in BACKEND_SCHEMES or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// URL with a host; {shape}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url!r} has a query, fragment or credentials; {shape}")


def parse_device_list(value: str) -> tuple[str, ...]:
    """A comma-separated list of device ids (CUDA_VISIBLE_DEVICES values), e.g. 0,1."""
    if value == "":
        return ()
    devices = tuple(part.strip() for part in value.split(","))
    if any(not device or " " in device for device in devices):
        raise ValueError("must be device ids separated by commas, e.g. 0,1 (one per replica)")
    return devices
