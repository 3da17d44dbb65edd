"""serve_http: runs the API server's uvicorn until SIGINT/SIGTERM, or until the engine dies.

As in vLLM, a dead engine core ends the API server (unless `keep_alive_on_engine_death`): a
supervisor (systemd, Kubernetes) then restarts it, instead of a server answering 503 forever. The
requests in flight get their error first, as they do while the server stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from pagedserve.engine.exceptions import EngineDeadError

if TYPE_CHECKING:
    from pagedserve.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# Seconds between two checks of the engine core's health.
WATCHDOG_INTERVAL_S = 0.25

# Exit status of a server that stopped because its engine died.
ENGINE_DEAD_EXIT_CODE = 1


class UvicornServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # NOTE: uvicorn's own version re-raises SIGTERM/SIGINT once serving stops, which kills
        # the process before run_server's `finally` shuts the engine and its workers down.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


async def watchdog_loop(server: uvicorn.Server, engine: AsyncLLM) -> None:
    """Returns once the engine is dead, after telling `server` to stop. `check_health` fails
    every request in flight first; uvicorn's graceful shutdown then lets their responses (a 503,
    or a stream's error event) finish."""
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        try:
            await engine.check_health()
        except EngineDeadError as e:
            logger.error("the engine core is dead (%s): stopping the API server", e)
            server.should_exit = True
            return


async def serve_http(
    config: uvicorn.Config, sock: socket.socket, engine: AsyncLLM, keep_alive_on_engine_death: bool = False
) -> int:
    """Serves until a signal (-> 0) or the engine's death (-> ENGINE_DEAD_EXIT_CODE)."""
    server = UvicornServer(config)
    watchdog = None if keep_alive_on_engine_death else asyncio.create_task(watchdog_loop(server, engine))
    try:
        await server.serve(sockets=[sock])
    finally:
        if watchdog is not None and not watchdog.done():
            watchdog.cancel()
    stopped_by_watchdog = (
        watchdog is not None and watchdog.done() and not watchdog.cancelled() and watchdog.exception() is None
    )
    return ENGINE_DEAD_EXIT_CODE if stopped_by_watchdog else 0
