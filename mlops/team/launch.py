"""``mlops server``: the team's MLflow tracking and registry server, checked before it starts.

It runs ``mlflow server`` with the PostgreSQL backend store, artifacts proxied to S3
(``--artifacts-destination``, through boto3) and the project's auth app (``--app-name mlops``,
:mod:`mlops.team.app`: basic-auth plus the promotion policy and the server-side audit trail).
Before starting it checks, each failure one line that names what is wrong:

- the admin password is in the environment variable ``server.admin_password_env`` (there is no
  default, and it is never printed or written to a file);
- the database answers (and the users' database, when it is another one);
- the bucket exists and can be reached (``MLFLOW_S3_ENDPOINT_URL`` for the endpoint).

The admin user is created in the users' database from that variable before the server
starts (MLflow's own bootstrap then finds it); an existing admin whose password differs is
refused rather than silently kept. Secrets reach ``mlflow server`` through its environment
(``MLFLOW_BACKEND_STORE_URI``), never its command line, which ``ps`` shows to every user.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from mlops.config import TeamServerConfig
from mlops.db import create_engine, expand_env, mask_url, scrub
from mlops.errors import ConfigError
from mlops.serving.nodelay import IMPORT_PATH as NODELAY
from mlops.team import files

logger = logging.getLogger(__name__)

APP_NAME = "mlops"


@dataclass(frozen=True)
class Checked:
    """What was checked and will be started."""

    backend: str  # expanded: may hold a secret, never printed
    auth_database: str
    artifacts: str
    password: str


def check(config: TeamServerConfig) -> Checked:
    """Everything ``mlops server`` checks before it starts; raises ConfigError naming the fault."""
    password = os.environ.get(config.admin_password_env, "")
    if not password:
        raise ConfigError(
            f"mlops server: no admin password: set {config.admin_password_env} in the "
            "environment (there is no default; choose a long random one)"
        )
    backend = expand_env(config.backend_store_uri)
    auth_db = expand_env(config.auth_database_uri or config.backend_store_uri)
    _check_database(backend, "backend store (server.backend_store_uri)")
    if auth_db != backend:
        _check_database(auth_db, "users' database (server.auth_database_uri)")
    _check_artifacts(config.artifacts_destination)
    return Checked(backend, auth_db, config.artifacts_destination, password)


def _check_database(url: str, what: str) -> None:
    import sqlalchemy as sa

    try:
        engine = create_engine(url, connect_timeout=5)
    except Exception as exc:  # noqa: BLE001 - a malformed URL or a missing driver
        raise ConfigError(
            f"mlops server: the {what} URL is not usable: {_first(exc, url)}"
        ) from None
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - down, refused, unknown database, bad password
        raise ConfigError(
            f"mlops server: the {what} at {mask_url(url)} is not reachable: {_first(exc, url)}"
        ) from None
    finally:
        engine.dispose()


def _check_artifacts(destination: str) -> None:
    parsed = urllib.parse.urlparse(destination)
    if parsed.scheme != "s3":
        if parsed.scheme not in ("", "file"):
            raise ConfigError(
                f"mlops server: server.artifacts_destination {destination!r}: use s3://bucket/"
                "prefix (or a local folder for a trial)"
            )
        return
    bucket = parsed.netloc
    if not bucket:
        raise ConfigError(
            f"mlops server: {destination!r} names no bucket; write s3://bucket/prefix"
        )
    import boto3
    import botocore.config
    import botocore.exceptions

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    where = f"at {endpoint}" if endpoint else "on AWS S3"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=botocore.config.Config(
            connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}
        ),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ConfigError(
                f"mlops server: the bucket {bucket!r} does not exist {where}; create it (or fix "
                "server.artifacts_destination)"
            ) from None
        raise ConfigError(
            f"mlops server: the bucket {bucket!r} {where} refused access ({code}); check the "
            "AWS credentials in the environment"
        ) from None
    except botocore.exceptions.NoCredentialsError:
        raise ConfigError(
            f"mlops server: no AWS credentials for the bucket {bucket!r} {where}; set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)"
        ) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise ConfigError(
            f"mlops server: the S3 endpoint for bucket {bucket!r} {where} is not reachable: "
            f"{(str(exc).splitlines() or [''])[0][:200]}"
        ) from None


def bootstrap_admin(checked: Checked, username: str) -> None:
    """Create the admin user from the environment's password, or check the existing one's."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(checked.auth_database)
    try:
        if not store.has_user(username):
            store.create_user(username, checked.password, is_admin=True)
            logger.info("created the admin user %r", username)
        elif not store.authenticate_user(username, checked.password):
            raise ConfigError(
                f"mlops server: the admin user {username!r} exists with another password than "
                "the environment's; set the variable to the current one (change it with "
                "MLflow's update-password API)"
            )
    finally:
        engine = getattr(store, "engine", None)
        if engine is not None:
            engine.dispose()


def _auth_ini(checked: Checked, config: TeamServerConfig, folder: Path) -> Path:
    """MLflow's auth config for this server: no password in it (the admin exists already)."""
    ini = folder / "auth.ini"
    ini.write_text(
        "[mlflow]\n"
        f"default_permission = {config.default_permission}\n"
        f"database_uri = {checked.auth_database.replace('%', '%%')}\n"
        f"admin_username = {config.admin_username}\n"
        "admin_password =\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a verified login is remembered this long in each worker (MLflow 3.17 and later):
        # checking a password hash costs about 0.3 s of CPU, on every request without it
        f"auth_cache_ttl_seconds = {config.auth_cache_seconds}\n"
    )
    ini.chmod(0o600)
    return ini


def command(config: TeamServerConfig) -> list[str]:
    """The ``mlflow server`` command line (no secret in it)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--artifacts-destination",
        config.artifacts_destination,
        "--serve-artifacts",
        "--app-name",
        APP_NAME,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--workers",
        str(config.workers),
        # Nagle off on every connection (uvicorn leaves it on with more than one worker)
        "--uvicorn-opts",
        f"--http {NODELAY}",
    ]


def run(config: TeamServerConfig) -> int:
    """Check, bootstrap the admin, then run ``mlflow server`` until it stops or is stopped."""
    checked = check(config)
    bootstrap_admin(checked, config.admin_username)
    with tempfile.TemporaryDirectory(prefix="mlops-server-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o700)
        ini = _auth_ini(checked, config, folder)
        env = {
            **os.environ,
            "MLFLOW_BACKEND_STORE_URI": checked.backend,
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLOPS_AUDIT_URL": checked.backend,
            # the model files its workers read from S3, shared (mlops.team.files)
            files.CACHE_DIR_ENV: str(folder / "files"),
            files.CACHE_MB_ENV: str(config.file_cache_mb),
            # a worker's own flask secret: the same in every worker (CSRF), new each start
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get(
                "MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32)
            ),
        }
        env.pop(config.admin_password_env, None)
        logger.info(
            "mlops server: %s, artifacts %s, on http://%s:%d (%d workers)",
            mask_url(config.backend_store_uri),
            config.artifacts_destination,
            config.host,
            config.port,
            config.workers,
        )
        process = subprocess.Popen(command(config), env=env, start_new_session=True)

        def forward(signum: int, _frame: object) -> None:
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        try:
            return process.wait()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def _first(exc: BaseException, url: str) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = (str(orig).strip().splitlines() or [exc.__class__.__name__])[0][:300]
    return scrub(text, url)
