"""A streamed request's prompt tokens, counted by the backend that serves it.

llama_cpp.server 0.3 sends no usage in a stream, so the gateway asks the same backend,
while the request still holds its slot (no one else's generation is interrupted), to
tokenize what the model was given, with `POST /extras/tokenize/count`:

- for /v1/completions, the prompt as sent. The server counts its tokens with the
  tokenizer's own BOS/EOS, and so does that route;
- for /v1/chat/completions, the chat prompt rendered exactly as the server renders it,
  from the model's chat template (proxy/chattemplate.py). The server tokenizes that text
  without adding BOS (the template writes it), while the route adds what the tokenizer
  adds on its own; the route's count of "" is that difference, and is taken off.

A count that cannot be made (no template for chat, a prompt that is not text, the
backend not answering in time) is left unknown (NULL), never guessed, and never breaks
the answer.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from proxy.chattemplate import ChatTemplate, TemplateError

log = logging.getLogger(__name__)

COUNT_ROUTE = "/extras/tokenize/count"
COUNT_TIMEOUT_SECONDS = 5.0


def wants_usage(body: dict) -> bool:
    """True if the client asked for a usage event at the end of its stream."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class PromptCounter:
    """Counts prompt tokens on a backend; remembers what its tokenizer adds to any text."""

    def __init__(
        self, session: aiohttp.ClientSession, backend_key: str, template: ChatTemplate | None
    ) -> None:
        self.session = session
        self.backend_key = backend_key
        self.template = template
        self.added_by_tokenizer: dict[str, int] = {}  # per backend URL

    async def count(self, backend_url: str, route: str, body: dict) -> int | None:
        """The prompt tokens of `body` as the backend counts them; None if unknown."""
        try:
            async with asyncio.timeout(COUNT_TIMEOUT_SECONDS):
                return await self._count(backend_url, route, body)
        except (
            aiohttp.ClientError,
            TimeoutError,
            TemplateError,
            ValueError,
            KeyError,
            TypeError,
        ) as error:
            log.warning("could not count the prompt tokens of a stream: %r", error)
            return None

    async def _count(self, backend_url: str, route: str, body: dict) -> int | None:
        if route == "/v1/completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return len(prompt)  # token ids, counted as they are
            return await self._tokens(backend_url, prompt) if isinstance(prompt, str) else None
        if self.template is None:
            return None
        text = self.template.render(body)
        added = self.added_by_tokenizer.get(backend_url)
        if added is None:
            added = self.added_by_tokenizer[backend_url] = await self._tokens(backend_url, "")
        return await self._tokens(backend_url, text) - added

    async def _tokens(self, backend_url: str, text: str) -> int:
        async with self.session.post(
            backend_url + COUNT_ROUTE,
            json={"input": text},
            headers={"Authorization": f"Bearer {self.backend_key}"},
        ) as answer:
            answer.raise_for_status()
            return int((await answer.json())["count"])
