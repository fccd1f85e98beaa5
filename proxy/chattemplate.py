"""The model's chat template, rendered as llama_cpp.server renders it, to count a chat prompt.

llama_cpp.server 0.3 turns a chat request into text with the Jinja template in the GGUF
file's `tokenizer.chat_template` (Jinja2ChatFormatter in llama_cpp/llama_chat_format.py):
a sandboxed environment with trim_blocks and lstrip_blocks, `{% generation %}` tags
ignored, loop controls, a `tojson` that keeps non-ASCII text, and the variables below.
This module does the same, so that the text it renders is the one the model was given.

The template and the BOS/EOS token texts come from the GGUF header, read with
proxy/ggufheader.py (the gguf package would pull numpy into the gateway).
When the backend is started with another chat format (`--chat_format` in
LLAMA_EXTRA_ARGS), or the file has no template, there is nothing to render with.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from proxy.ggufheader import HeaderError, read_fields

TEMPLATE_KEY = "tokenizer.chat_template"
BOS_KEY, EOS_KEY, TOKENS_KEY = (
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.tokens",
)
# What the chat handler passes on to the template besides the messages.
TEMPLATE_ARGUMENTS = ("functions", "function_call", "tools", "tool_choice")


class TemplateError(Exception):
    """The chat template could not be read or rendered."""


class IgnoreGenerationTags(jinja2.ext.Extension):
    """Pass-through for Hugging Face's `{% generation %}` tag, as llama_cpp does."""

    tags = {"generation"}

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class ChatTemplate:
    """A compiled chat template with the BOS and EOS texts it may write."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        self.bos_token = bos_token
        self.eos_token = eos_token
        environment = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols],
        )
        environment.filters["tojson"] = tojson
        try:
            self.compiled = environment.from_string(source)
        except jinja2.TemplateError as error:
            raise TemplateError(f"the chat template does not compile: {error}") from None

    def render(self, body: dict) -> str:
        """The prompt text of a chat request body, with the generation prompt at its end."""
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise TemplateError("the request has no list of messages")
        try:
            return self.compiled.render(
                messages=messages,
                eos_token=self.eos_token,
                bos_token=self.bos_token,
                raise_exception=_raise,
                add_generation_prompt=True,
                strftime_now=lambda form: datetime.now().strftime(form),
                **{name: body.get(name) for name in TEMPLATE_ARGUMENTS},
            )
        except (jinja2.TemplateError, TypeError, ValueError) as error:
            raise TemplateError(f"the chat template failed on this request: {error}") from None


def _raise(message: str) -> None:
    raise ValueError(message)


def read_chat_template(path: Path) -> ChatTemplate | None:
    """The chat template of a GGUF file, or None if it has none; TemplateError if unreadable."""
    try:
        with path.open("rb") as file:
            _, metadata = read_fields(file, arrays=frozenset({TOKENS_KEY}))
    except (OSError, HeaderError) as error:
        raise TemplateError(f"cannot read the chat template from {path}: {error}") from None
    source = metadata.get(TEMPLATE_KEY)
    if not isinstance(source, str):
        return None
    tokens = metadata.get(TOKENS_KEY) or []

    def text_of(key: str) -> str:
        index = metadata.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

    return ChatTemplate(source, text_of(BOS_KEY), text_of(EOS_KEY))
