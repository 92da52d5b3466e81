"""Real server processes for tests: started on a free loopback port, awaited, always stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def server_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_REGISTRY_URI=tracking_uri,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        **extra,
    )
    return env


def models_serve(model_uri: str, port: int, mlflow_bin: str | None = None) -> list[str]:
    """The command line of a stock `mlflow models serve` of ``model_uri`` on loopback ``port``,
    one worker, the local environment (``mlflow_bin``: another MLflow than the tests')."""
    return [
        mlflow_bin or str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "--workers",
        "1",
    ]


@contextmanager
def running(
    command: list[str],
    env: dict[str, str],
    port: int,
    log: Path,
    timeout: float = 180,
    health: str = "/ping",
) -> Iterator[str]:
    """Run ``command`` until it answers GET ``health`` on ``port``; yield its base URL; stop it.

    A scoring server answers ``/ping``; ``mlflow server`` (tracking) only ``/health``.
    """
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(base + health, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server did not answer {health} in {timeout}s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)


def post(
    base: str,
    body: Any,
    content_type: str = "application/json",
    path: str = "/invocations",
    token: str | None = None,
) -> tuple[int, Any]:
    """POST ``body`` (a JSON-able object, or str/bytes sent as is), with a bearer ``token`` if
    given; return (status, parsed body)."""
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    data = data.encode() if isinstance(data, str) else data
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def get(base: str, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(base + path, timeout=10) as resp:
        return resp.status, resp.read().decode()


# credentials moto's S3 server accepts (any will do); set them with MLFLOW_S3_ENDPOINT_URL
MOTO_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3(port: int, log: Path) -> Iterator[str]:
    """moto's standalone S3 server on loopback ``port``, awaited; yields its endpoint URL."""
    with running(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        {**os.environ, **MOTO_S3_ENV},
        port,
        log,
        timeout=60,
        health="/moto-api/",
    ) as endpoint:
        yield endpoint
