"""The server behind ``mlops serve``: MLflow's scoring app, run by uvicorn, with a clean shutdown.

The protocol is MLflow's own (``scoring_server.init`` builds the app: the same routes,
formats and error bodies as ``mlflow models serve``), its ``/invocations`` guarded by
:mod:`mlops.serving.adapter` (one input contract, clean error answers). Around it, two small
ASGI layers: :class:`BodyLimit` answers a body over the model's ``max_body_bytes`` with a
413 before reading it (``mlflow models serve`` can only refuse it once read whole), and
:class:`GracefulShutdown` answers the lifespan protocol itself, so that a graceful stop
(SIGTERM, Ctrl-C) flushes every prediction log of the process after the last request was
answered: pure ASGI, no framework event hook.

``mlops serve`` runs :func:`main` in a child process and stays its parent until everything
the server started has exited (see ``mlops.cli.serve``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import scoring_server

from mlops.serving import adapter
from mlops.serving.adapter import SERVER_MODEL_PATH_ENV

logger = logging.getLogger(__name__)

MODEL_URI_ENV = "MLOPS_SERVE_MODEL_URI"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class GracefulShutdown:
    """ASGI middleware: lifespan events are answered here; shutdown runs ``on_shutdown`` first."""

    def __init__(self, app: Any, on_shutdown: Callable[[], None]) -> None:
        self.app = app
        self.on_shutdown = on_shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        # MLflow's app has no startup or shutdown work of its own
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    self.on_shutdown()
                except Exception as exc:  # noqa: BLE001 - a failed flush must not hang the stop
                    logger.error("shutdown work failed: %s", exc)
                await send({"type": "lifespan.shutdown.complete"})
                return


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 and is never held in
    memory: refused from its Content-Length before a byte of it is read, or, sent in chunks,
    as soon as the count passes the limit (what is under the limit is passed on whole).

    A client that sends its whole body before reading the answer (most do, and uvicorn drops
    a ``Connection: close`` client's connection right after the answer, unread bytes and all)
    would see a reset instead of the 413; so the rest of the body is read and dropped first,
    up to ``8 * limit`` bytes. A client that asked to ``Expect: 100-continue`` is answered at
    once and never sends the body.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.drain = 8 * limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None:  # the server reads no more than that: check it and go on
            if length.strip().isdigit() and int(length) > self.limit:
                if b"100-continue" not in headers.get(b"expect", b"").lower():
                    await self.discard(receive, 0 if int(length) <= self.drain else self.drain)
                await self.refuse(send)
                return
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:  # chunked (or no body): counted as it arrives
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self.discard(receive, size, more=bool(message.get("more_body")))
                await self.refuse(send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        whole: list[dict[str, Any]] = [
            {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        ]

        async def replay() -> dict[str, Any]:
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)

    async def discard(self, receive: Receive, size: int, *, more: bool = True) -> None:
        """Read the rest of a refused body, keeping none of it, up to ``drain`` bytes."""
        while more and size <= self.drain:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            more = bool(message.get("more_body"))

    async def refuse(self, send: Send) -> None:
        body = adapter.too_large(self.limit).encode()
        await send(
            {
                "type": "http.response.start",
                "status": adapter.TOO_LARGE,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def scoring_app(model: Any) -> Any:
    """MLflow's scoring app for ``model``, guarded, refusing bodies over the model's limit."""
    adapter.install_guard()  # the fast path installed it at load; MLflow's path needs it too
    app = scoring_server.init(model)
    limit = adapter.body_limit(model)
    return BodyLimit(app, limit) if limit else app


def close_prediction_logs() -> None:
    from mlops.monitoring.logger import PredictionLogger

    PredictionLogger.close_all(timeout=5.0)


def create_app() -> GracefulShutdown:
    """The ASGI app of one worker, serving the model named by ``$MLOPS_SERVE_MODEL_URI``."""
    uri = os.environ[MODEL_URI_ENV]
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    verify_registered(uri, Path(local))  # before MLflow imports any of the model's code
    os.environ[SERVER_MODEL_PATH_ENV] = (
        local  # as `mlflow models serve` does: the wrapper knows it serves
    )
    model = scoring_server.load_model_with_mlflow_config(local)
    return GracefulShutdown(scoring_app(model), close_prediction_logs)


_MODELS_URI = re.compile(r"models:/([^/@]+)(?:/(\d+)|@(.+))")


def pinned(uri: str) -> str:
    """``models:/NAME@ALIAS`` as ``models:/NAME/VERSION`` (the version the alias names now)."""
    match = _MODELS_URI.fullmatch(uri)
    if not match or not match.group(3):
        return uri
    name, _, alias = match.groups()
    version = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    return f"models:/{name}/{version.version}"


def verify_registered(uri: str, local: Path) -> None:
    """Refuse a registered version whose files differ from what was registered (its checksum
    tag), before anything of it is imported or deserialised."""
    from mlops.artifacts import CHECKSUM_TAG, UntrustedArtifact, verify_model_dir

    match = _MODELS_URI.fullmatch(uri)
    if not match:
        return
    name, number, alias = match.groups()
    client = mlflow.MlflowClient()
    version = (
        client.get_model_version(name, number)
        if number
        else client.get_model_version_by_alias(name, alias)
    )
    recorded = (version.tags or {}).get(CHECKSUM_TAG)
    if not recorded:
        logger.warning(
            "%s version %s has no recorded checksum (registered outside mlops): its files "
            "cannot be verified",
            name,
            version.version,
        )
        return
    try:
        verify_model_dir(local, recorded, f"{name} version {version.version}")
    except UntrustedArtifact as exc:
        logger.error("%s", exc)
        raise SystemExit(f"mlops serve: {exc}") from None


def serve(model_uri: str, *, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> None:
    """Serve ``model_uri`` until stopped (each of ``workers`` processes loads it once)."""
    import tempfile

    import uvicorn

    model_uri = pinned(model_uri)  # every worker loads the same version, even if the alias moves
    with tempfile.TemporaryDirectory() as tmp:  # refuse tampered files before any worker starts
        verify_registered(
            model_uri,
            Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)),
        )
    os.environ[MODEL_URI_ENV] = model_uri
    uvicorn.run(
        "mlops.serving.server:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_graceful_shutdown=30,
        log_level="info",
    )


def main(argv: list[str] | None = None) -> None:
    """``serve`` from a command line: what ``mlops serve`` runs in its child process."""
    import argparse

    parser = argparse.ArgumentParser(description=serve.__doc__)
    parser.add_argument("model_uri")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    serve(args.model_uri, host=args.host, port=args.port, workers=args.workers)
