"""The server behind ``mlops serve``: MLflow's scoring app, run by uvicorn, with a clean shutdown.

The protocol is MLflow's own (``scoring_server.init`` builds the app: the same routes,
formats and error bodies as ``mlflow models serve``). Around it, a small ASGI layer answers
the lifespan protocol itself, so that a graceful stop (SIGTERM, Ctrl-C) flushes every
prediction log of the process after the last request was answered: pure ASGI, no
framework event hook.
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
    return GracefulShutdown(scoring_server.init(model), close_prediction_logs)


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
    from mlops.artifacts import CHECKSUM_TAG, UntrustedArtifact, model_checksum, verify_checksum

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
        verify_checksum(model_checksum(local), recorded, f"{name} version {version.version}")
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
