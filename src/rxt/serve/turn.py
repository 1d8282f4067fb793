"""One answer in flight on the server, as the HTTP side sees it: a queue of token events ending in the answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from rxt.engine import AnswerEvent, TokenEvent
from rxt.serve.snapshots import response_id

__all__ = ["Turn"]


class Turn:
    """One answer in flight: the HTTP side reads ``next()`` until an AnswerEvent (or an error)."""

    def __init__(self, session_id: str, prompt_tokens: int):
        self.session_id, self.prompt_tokens = session_id, prompt_tokens
        self.response_id = response_id(session_id)  # the Responses API's name for this turn's memory
        # Responses API: when set, the memory this turn leaves is kept under response_id, with the response
        # object this makes of the answer (set before the turn's task runs: right after start_turn)
        self.describe: Callable[[AnswerEvent], dict] | None = None
        self.queue: asyncio.Queue[TokenEvent | AnswerEvent | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()  # the client went away: stop generating, remember nothing
        self.history_reread = False  # a stateless session whose KV cache was not kept: its history is read again

    async def next(self) -> TokenEvent | AnswerEvent:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def ready(self) -> list[TokenEvent | AnswerEvent | BaseException]:
        """What is already queued, taken without waiting."""
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    async def answer(self) -> AnswerEvent:
        while not isinstance(event := await self.next(), AnswerEvent):
            pass
        return event
