"""The aiohttp application: routes, JSON errors for everything, API-key check, and `serve()` which listens
at once (answering 503 while the model loads, as llama-server does) and loads the engine in a thread.

    state = ServerState(ServerConfig(model_path=..., n_parallel=2))
    await serve(state, "127.0.0.1", 8080, load=lambda: LocalEngine.load(path, n_parallel=2))
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import native_api, openai_api
from .engine_api import Engine, EngineLoadError
from .generation import json_response, to_api_error
from .params import ApiError
from .state import STATE, ServerState

log = logging.getLogger("hybridllm.server")

__all__ = ["PUBLIC_PATHS", "make_app", "serve", "start"]

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})  # answered without the API key, like llama-server
MAX_BODY = 64 << 20
_HTTP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    """Every failure becomes {"error": {"code", "message", "type"}}; no exception reaches aiohttp."""
    try:
        return await handler(request)
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
        if exc.status < 400:
            raise
        message = "File Not Found" if exc.status == 404 else exc.reason
        err = ApiError(message, exc.status, _HTTP_ERROR_TYPES.get(exc.status, "invalid_request_error"))
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away: nothing to answer
    except Exception as exc:
        err = to_api_error(exc)
        if err.status == 503:  # a worker is down: expected, /health says so; no traceback
            log.warning("%s %s: %s", request.method, request.path, err.message)
        elif err.status >= 500:
            log.exception("%s %s failed", request.method, request.path)
    return json_response(err.body(), status=err.status)


def _api_key_check(api_key: str) -> Callable:
    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            given = request.headers.get("Authorization") or request.headers.get("X-Api-Key") or ""
            given = given.removeprefix("Bearer ")
            if given != api_key:
                raise ApiError("Invalid API Key", 401, "authentication_error")
        return await handler(request)
    return check


def make_app(state: ServerState) -> web.Application:
    middlewares = [_json_errors]
    if state.config.api_key:
        middlewares.append(_api_key_check(state.config.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[STATE] = state
    app.add_routes(openai_api.routes)
    app.add_routes(native_api.routes)
    return app


async def start(state: ServerState, host: str, port: int) -> web.AppRunner:
    """Listen on host:port; returns the runner (`await runner.cleanup()` stops it)."""
    # handler_cancellation: a client that disconnects cancels its handler, which stops its generation
    runner = web.AppRunner(make_app(state), handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


async def serve(state: ServerState, host: str, port: int, load: Callable[[], Engine],
                stop: asyncio.Event | None = None) -> int:
    """Listen, load the engine in a thread (503 meanwhile), serve until `stop` is set or SIGINT/SIGTERM.
    Returns 0, or 1 when the model failed to load."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests) or no signals on this platform
    runner = await start(state, host, port)
    log.info("listening on http://%s:%d (loading %s)", host, port, state.config.model_path)
    engine: Engine | None = None
    try:
        loading = _in_daemon_thread(load)
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():  # stopped while loading: the daemon thread dies with the process
            log.info("stopped while loading")
            loading.add_done_callback(_close_late_engine)
            return 0
        stopping.cancel()
        try:
            engine = loading.result()
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            state.set_load_error(f"failed to load the model: {message}")
            log.error("%s", state.load_error)
            if not isinstance(exc, EngineLoadError):  # not a user error: the traceback helps (with -v)
                log.debug("load failed", exc_info=exc)
            return 1
        state.set_engine(engine)
        info = engine.info
        log.info("model %s ready: %d slot(s) of %d tokens, device %s", info.name, engine.n_slots, info.n_ctx,
                 info.device)
        await stop.wait()
        log.info("shutting down")
        return 0
    finally:
        await runner.cleanup()
        if engine is not None:
            await engine.close()


def _in_daemon_thread(fn: Callable[[], Engine]) -> asyncio.Future[Engine]:
    """Run fn in a daemon thread (not the default executor, which asyncio.run joins at exit: a server
    stopped while a big model loads must not wait for the load to finish)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Engine] = loop.create_future()

    def settle(result: Engine | None, exc: BaseException | None) -> None:
        if fut.cancelled():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, exc = fn(), None
        except BaseException as e:  # noqa: BLE001 - handed to the loop
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop is gone (server stopped meanwhile)
            pass
    threading.Thread(target=work, name="hybridllm-load", daemon=True).start()
    return fut


def _close_late_engine(fut: asyncio.Future[Engine]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        asyncio.ensure_future(fut.result().close())
