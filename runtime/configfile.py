"""Edit runtime/config.env in place, keeping its comments, its other keys and mode 600."""

from __future__ import annotations

import re
from pathlib import Path

from dotenv import set_key

# Values made only of these stay unquoted, as the installer writes them; anything else
# (spaces, #, quotes, backslashes) would be cut or mangled by the parser unquoted.
PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.,:/@+-]*")


def set_config_value(path: Path, key: str, value: str) -> None:
    """Set KEY=value, replacing the existing line or appending one; atomic."""
    # set_key rewrites the file through a temporary file beside it and keeps its mode.
    # The quoting is ours: the escaping of its quote_mode="always" differs across
    # python-dotenv versions, while single quotes with \\ and \' escaped read back
    # exactly in all of them. (python-dotenv expands ${VAR} even in quotes, as the loader
    # does everywhere; there is no escape for it.)
    if not PLAIN_VALUE.fullmatch(value):
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    set_key(path, key, value, quote_mode="never")
