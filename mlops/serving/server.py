"""The server behind ``mlops serve``: MLflow's scoring protocol, following the registry.

Its own ASGI app (Starlette) speaks MLflow's scoring protocol exactly: ``POST /invocations``
with the same formats, content types and error bodies (each request answered by
:func:`mlops.serving.adapter.answer`, the guard ``mlflow models serve`` answers through),
``/ping``, ``/health``, ``/version`` (MLflow's version as MLflow answers it, the version
serving each alias in the ``X-Mlops-Served`` header and what scores it, ``native`` or
``onnx/<variant>``, in ``X-Mlops-Runtime``), and ``GET /metrics`` for Prometheus
(:mod:`mlops.serving.metrics`).

What it serves follows the registry: each alias is resolved every ``serving.reload_interval``
seconds, and a version it moves to is verified, loaded and warmed up in the background, then
swapped in (:mod:`mlops.serving.follower`); requests are routed between aliases (an A/B split)
and scored again by a shadow (:mod:`mlops.serving.routing`).

Two small ASGI layers stay pure: :class:`BodyLimit` answers a body over the model's
``max_body_bytes`` with a 413 before reading it (``mlflow models serve`` can only refuse it
once read whole), and :class:`GracefulShutdown` answers the lifespan protocol itself, so that
a graceful stop (SIGTERM, Ctrl-C) stops following, drains the shadow and flushes every
prediction log of the process after the last request was answered.

``mlops serve`` runs :func:`main` in a child process and stays its parent until everything
the server started has exited (:func:`supervise`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlops.artifacts import download_model, verify_model_dir, verify_registered
from mlops.errors import MlopsError
from mlops.monitoring.logger import PredictionLogger
from mlops.serving import adapter
from mlops.serving.follower import PINNED, AliasFollower, Loader, Served, Watcher
from mlops.serving.metrics import MULTIPROC_ENV, ServerMetrics
from mlops.serving.routing import ROUTE_HEADER, Router, ShadowScorer
from mlops.serving.wrapper import REQUEST_ID_COLUMN

logger = logging.getLogger(__name__)

SPEC_ENV = "MLOPS_SERVE_SPEC"  # what each worker serves (a ServeSpec as JSON)
SERVED_HEADER = "X-Mlops-Served"  # on /version: {"alias": "version", ...} as JSON
# on /version: what scores each alias's version, {"alias": "native" | "onnx/<variant>"} as JSON
RUNTIME_HEADER = "X-Mlops-Runtime"
TIMEOUT_BODY = "Request processing time exceeded limit"  # MLflow's 504, word for word
STARTUP_FAILURE = 3  # uvicorn's exit status for a worker that could not start: not restarted
_ROUTE_KEY = ROUTE_HEADER.lower().encode()  # as ASGI gives header names

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


class BearerAuth:
    """Every request but the probes (``/ping``, ``/health``) must carry ``Authorization: Bearer
    <token>``; else a 401 (``mlops serve --auth-token-env VAR``, the token in ``$VAR``)."""

    OPEN = frozenset(("/ping", "/health"))

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "error_code": "UNAUTHENTICATED",
                "message": "this server needs the header Authorization: Bearer <token> "
                + ("(the token given is not the server's)" if given else "(none was sent)"),
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="mlops"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# ---- what one server serves ----
@dataclasses.dataclass(frozen=True)
class ServeSpec:
    """What ``mlops serve`` serves: the arms (aliases and their shares of the traffic), or one
    pinned version, and a shadow alias."""

    name: str
    arms: tuple[tuple[str, float], ...] = (("production", 1.0),)
    version: str | None = None  # a version served by number, not followed
    shadow: str | None = None
    reload_interval: float = 10.0
    shadow_queue: int = 1000
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    workdir: str | None = None  # downloads go here (the supervisor's folder, removed by it)
    auth_token_env: str | None = None  # the variable holding the bearer token callers must send
    # a version's files in a folder (a serving image's), served pinned without a registry once
    # they match ``checksum``
    model_dir: str | None = None
    checksum: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeSpec:
        raw = json.loads(text)
        raw["arms"] = tuple((str(alias), float(share)) for alias, share in raw["arms"])
        return cls(**raw)

    def describe(self) -> str:
        if self.model_dir:
            what = f"{self.name} version {self.version} from {self.model_dir}"
        elif self.version:
            what = f"models:/{self.name}/{self.version}"
        else:
            total = sum(share for _, share in self.arms)
            what = ", ".join(
                f"models:/{self.name}@{alias}"
                + (f" ({share / total:.0%})" if len(self.arms) > 1 else "")
                for alias, share in self.arms
            )
            what += f", following every {self.reload_interval:g} s"
        return what + (f", shadowed by @{self.shadow}" if self.shadow else "")


# ---- the app ----
class Invocations:
    """``POST /invocations``: routed, answered through the guard, counted and timed whole."""

    def __init__(self, router: Router, shadow: ShadowScorer | None, timeout: float) -> None:
        self.router, self.shadow, self.timeout = router, shadow, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = os.urandom(16).hex()
        key = next((v for k, v in scope["headers"] if k == _ROUTE_KEY), None)
        served = self.router.pick(key or request_id.encode())
        status: list[int] = []

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            await self.answer(served, request_id, scope, receive, send)

        try:
            await BodyLimit(answer, served.max_body_bytes)(scope, receive, sending)
        finally:
            served.release()
            if status:  # not a client that went away before its answer
                served.meter.observe(status[0], time.perf_counter() - started)

    async def answer(
        self, served: Served, request_id: str, scope: Scope, receive: Receive, send: Any
    ) -> None:
        request = Request(scope, receive)

        async def work() -> Any:
            body = await request.body()
            content_type = request.headers.get("content-type")
            return await asyncio.to_thread(self.score, served, request_id, body, content_type)

        try:  # as MLflow's server does: the whole request within its timeout, else a 504
            result = await asyncio.wait_for(work(), self.timeout)
        except ClientDisconnect:
            return
        except TimeoutError:
            response = Response(TIMEOUT_BODY, status_code=504, media_type="application/json")
        else:
            response = Response(result.response, result.status, media_type=result.mimetype)
        await response(scope, receive, send)

    def score(self, served: Served, request_id: str, data: bytes, content_type: str | None) -> Any:
        """The guarded answer (on a worker thread); scored rows counted and shadowed."""
        wrapper = served.wrapper

        def respond(body: Any, mime: str) -> str:
            def scored(rid: str, numeric: Any, categorical: Any) -> None:
                served.meter.rows.inc(numeric.shape[0])
                if self.shadow is not None:
                    self.shadow.offer(served, rid, body, mime, numeric, categorical)

            answer: str = wrapper.respond(body, mime, request_id=request_id, scored=scored)
            return answer

        original = adapter.unguarded_invocations()

        def mlflows(body: Any, mime: str, model: Any, input_schema: Any) -> Any:
            """MLflow's path (MLOPS_FAST_SERVING=0), for a body the contract accepted: its
            answer's rows counted, and parsed by the contract once more for a shadow."""
            result = original(body, mime, model, input_schema)
            if result.status != 200:
                return result
            try:
                answered = json.loads(result.response)["predictions"]
                served.meter.rows.inc(len(answered))
                if self.shadow is not None and answered:
                    # the id the answer was logged under (the wrapper's own on this path)
                    first = answered[0] if isinstance(answered[0], dict) else {}
                    rid = str(first.get(REQUEST_ID_COLUMN) or request_id)
                    numeric, categorical = wrapper.contract.parse(body, mime)
                    self.shadow.offer(served, rid, body, mime, numeric, categorical)
            except Exception as exc:  # noqa: BLE001 - the answer stands; only its shadow is lost
                logger.warning("MLflow's answer was not counted or shadowed: %s", exc)
            return result

        return adapter.answer(
            wrapper,
            mlflows,
            data,
            content_type,
            served.model,
            served.input_schema,
            respond=respond,
        )


class ProductionServer:
    """One worker's followers, router, shadow and metrics, and the app that serves them."""

    def __init__(self, spec: ServeSpec) -> None:
        self.spec = spec
        self.root = Path(tempfile.mkdtemp(prefix="mlops-serve-", dir=spec.workdir))
        self.metrics = ServerMetrics()
        loader = Loader(spec.name, spec.model_config, self.root, self.metrics)
        if spec.model_dir:
            loader.bundle(spec.model_dir, str(spec.checksum), str(spec.version))
        shadowed = spec.shadow is not None  # every answer's rows are logged, to compare
        if spec.version:
            arms = [(AliasFollower(loader, PINNED, pinned=spec.version), 1.0)]
        else:
            arms = [(AliasFollower(loader, a, monitor=shadowed), w) for a, w in spec.arms]
        self.followers = [follower for follower, _ in arms]
        shadow = AliasFollower(loader, spec.shadow, shadow=True) if spec.shadow else None
        if shadow is not None:
            self.followers.append(shadow)
        for follower in self.followers:
            follower.start()
        self.router = Router(arms)
        self.shadow = (
            ShadowScorer(shadow, self.metrics, spec.shadow_queue) if shadow is not None else None
        )
        self.watcher = Watcher(self.followers, spec.reload_interval, self.metrics.sync_logs)
        if not spec.version:
            self.watcher.start()

    def app(self) -> GracefulShutdown:
        async def ping(request: Request) -> Response:
            return Response(content="\n", status_code=200, media_type="application/json")

        async def version(request: Request) -> Response:
            return Response(
                content=mlflow.__version__,
                media_type="application/json",
                headers={
                    SERVED_HEADER: json.dumps(self.served()),
                    RUNTIME_HEADER: json.dumps(self.runtimes()),
                },
            )

        async def metrics(request: Request) -> Response:
            body, content_type = await asyncio.to_thread(self.metrics.exposition)
            return Response(content=body, headers={"Content-Type": content_type})

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)  # as FastAPI (MLflow's server) answers them
            return JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)

        invocations = Invocations(
            self.router, self.shadow, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
        )
        app = Starlette(
            routes=[
                Route("/ping", ping),
                Route("/health", ping),
                Route("/version", version),
                Route("/metrics", metrics),
                Route("/invocations", invocations, methods=["POST"]),
            ],
            exception_handlers={HTTPException: http_error},
        )
        token = os.environ.get(self.spec.auth_token_env, "") if self.spec.auth_token_env else ""
        if self.spec.auth_token_env and not token:
            raise MlopsError(f"--auth-token-env {self.spec.auth_token_env}: the variable is empty")
        return GracefulShutdown(BearerAuth(app, token) if token else app, self.close)

    def served(self) -> dict[str, str]:
        """The version serving each alias now (the pinned one as ``pinned``)."""
        return {follower.arm: follower.current.version for follower in self.followers}

    def runtimes(self) -> dict[str, str]:
        """What scores the version serving each alias: ``native`` or ``onnx/<variant>``."""
        return {
            follower.arm: str(getattr(follower.current.wrapper, "runtime", "native"))
            for follower in self.followers
        }

    def close(self) -> None:
        """Stop following, score what the shadow has queued, flush every prediction log."""
        self.watcher.stop()
        if self.shadow is not None:
            self.shadow.stop(timeout=5.0)
        PredictionLogger.close_all(timeout=5.0)
        for follower in self.followers:
            follower.close()
        shutil.rmtree(self.root, ignore_errors=True)


def create_app() -> GracefulShutdown:
    """The ASGI app of one worker, serving what ``$MLOPS_SERVE_SPEC`` names (uvicorn's factory).

    A version that cannot be served at start stops the worker with uvicorn's start-up failure
    status, so that its supervisor stops instead of restarting it.
    """
    spec = ServeSpec.from_json(os.environ[SPEC_ENV])
    # as `mlflow models serve` does for its workers: the wrapper knows it serves
    os.environ.setdefault(adapter.SERVER_MODEL_PATH_ENV, spec.workdir or tempfile.gettempdir())
    try:
        return ProductionServer(spec).app()
    except Exception as exc:  # noqa: BLE001 - said in one line (a bug with its traceback)
        expected = isinstance(exc, (MlopsError, MlflowException))
        logger.error("mlops serve: %s: %s", spec.describe(), exc, exc_info=not expected)
        raise SystemExit(STARTUP_FAILURE) from None


# ---- running it ----
def check(spec: ServeSpec) -> None:
    """Refuse, before any worker starts, what could not be served: an alias that names no
    version, a version whose files differ from what was registered."""
    if spec.model_dir:
        try:
            verify_model_dir(
                spec.model_dir, str(spec.checksum), f"{spec.name} version {spec.version}"
            )
        except MlopsError as exc:
            raise SystemExit(f"mlops serve: {spec.model_dir}: {exc}") from None
        return
    client = mlflow.MlflowClient()
    aliases = [] if spec.version else [alias for alias, _ in spec.arms]
    aliases += [spec.shadow] if spec.shadow else []
    wanted = {f"version {spec.version}": spec.version} if spec.version else {}
    label = ""
    try:
        for alias in aliases:
            label = f"@{alias}"
            wanted[label] = str(client.get_model_version_by_alias(spec.name, alias).version)
        for label, version in wanted.items():  # noqa: B007 - the error below names it
            with tempfile.TemporaryDirectory(dir=spec.workdir) as tmp:
                verify_registered(spec.name, version, download_model(spec.name, version, tmp))
    except (MlopsError, MlflowException) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise SystemExit(f"mlops serve: {spec.name} {label}: {message}") from None


def serve(spec: ServeSpec, *, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> None:
    """Serve ``spec`` until stopped (each of ``workers`` processes follows the registry)."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    check(spec)
    os.environ[SPEC_ENV] = spec.to_json()
    log_config = copy.deepcopy(LOGGING_CONFIG)  # reloads and refusals, in every worker's log
    log_config["loggers"]["mlops"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    from mlops.serving.nodelay import IMPORT_PATH

    uvicorn.run(
        "mlops.serving.server:create_app",
        factory=True,
        http=IMPORT_PATH,  # Nagle off on every connection, whatever the number of workers
        host=host,
        port=port,
        workers=workers,
        timeout_graceful_shutdown=30,
        log_level="info",
        log_config=log_config,
    )


def main(argv: list[str] | None = None) -> None:
    """:func:`serve` from a command line (``$MLOPS_SERVE_SPEC`` names what): what ``mlops
    serve`` runs in its child process."""
    import argparse

    parser = argparse.ArgumentParser(description=serve.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    spec = ServeSpec.from_json(os.environ[SPEC_ENV])
    serve(spec, host=args.host, port=args.port, workers=args.workers)


def supervise(spec: ServeSpec, *, host: str, port: int, workers: int) -> int:
    """Run the server as a child process until it exits; its exit status (0: stopped cleanly).

    The server (uvicorn and its workers) runs in a process group of its own, so a terminal's
    Ctrl-C reaches it once, through here. This process forwards SIGTERM and SIGINT to it, and
    returns not before everything the server started has exited: on Linux it is its
    descendants' subreaper, so what the server leaves behind (multiprocessing's resource
    tracker, a worker) comes back here, not to PID 1, and is waited for (killed if it
    outlives the server by 30 s). Killed itself, it takes the server down with it (SIGTERM, a
    graceful stop). Its folder (downloads, and with several workers prometheus-client's
    multiprocess files, so that ``/metrics`` sums them) is removed at the end.
    """
    workdir = tempfile.mkdtemp(prefix="mlops-serve-")
    env = dict(os.environ, **{SPEC_ENV: dataclasses.replace(spec, workdir=workdir).to_json()})
    if workers > 1:
        os.mkdir(Path(workdir) / "metrics")
        env[MULTIPROC_ENV] = str(Path(workdir) / "metrics")
    linux = sys.platform.startswith("linux")
    prctl: Any = None
    if linux:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

    def die_with_parent() -> None:  # in the child, before the server starts
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    try:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from mlops.serving.server import main; main(sys.argv[1:])",
                *("--host", host, "--port", str(port), "--workers", str(workers)),
            ],
            env=env,
            process_group=0,
            preexec_fn=die_with_parent if linux else None,  # no threads in this process
        )
        for forwarded in (signal.SIGTERM, signal.SIGINT):
            signal.signal(forwarded, lambda signum, _frame: child.send_signal(signum))
        code = child.wait()
        _reap(child.pid, linux)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return code if code >= 0 else 128 - code


def _reap(group: int, linux: bool) -> None:
    """Wait for the server's leftovers, re-parented to this process (killed after 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                overdue = time.monotonic() - deadline
                if overdue > 5:  # not in the server's group, so out of reach: say so
                    logger.error("mlops serve: a process the server started is still running")
                    break
                if overdue > 0:
                    os.killpg(group, signal.SIGKILL)
                time.sleep(0.05)
        except ChildProcessError:  # none left
            break
        except ProcessLookupError:  # the group is gone; its last members are being reaped
            pass
    if not linux:  # no subreaper: whatever is left in the server's group goes now
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
