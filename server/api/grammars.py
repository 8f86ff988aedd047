"""A request waiting for its grammar: the compile service's answer as the API's, and the wait
given up as soon as the client disconnects (the compile service then drops a compile that no
other request waits for, if it has not started)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.api.errors import ClientDisconnected, bad_request, overloaded, truncate, unavailable
from server.engine.structured.backend import CompiledStructure
from server.engine.structured.compile_pool import CompileBacklogFull, CompilerUnavailable
from server.engine.structured.service import GrammarService
from server.engine.structured.spec import StructuredSpec, StructuredSpecError

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]  # ASGI's (starlette.types.Receive)


async def compile_for_request(service: GrammarService, spec: StructuredSpec,
                              receive: Receive | None = None) -> CompiledStructure:
    task = asyncio.ensure_future(service.compile(spec))
    watcher = asyncio.ensure_future(_disconnect(receive)) if receive is not None else None
    try:
        if watcher is not None:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                raise ClientDisconnected()
        return await task
    except StructuredSpecError as e:
        raise bad_request(truncate(e.message, 400), param=e.param) from None
    except CompileBacklogFull as e:
        raise overloaded(f"The grammar compiler is busy: {e}; retry later.") from None
    except CompilerUnavailable as e:
        raise unavailable(f"The grammar compiler is not available ({e}); retry later.") from None
    finally:
        for t in (task, watcher):
            if t is not None and not t.done():
                t.cancel()
        if not task.done():
            await asyncio.gather(task, return_exceptions=True)  # its cleanup: drop an unstarted compile


async def _disconnect(receive: Receive) -> None:
    while (await receive()).get("type") != "http.disconnect":
        pass
