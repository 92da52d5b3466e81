"""Following a registered-model alias: each version verified, warmed up, then swapped in.

An :class:`AliasFollower` holds the version its alias names, loaded (:class:`Served`). Every
``serving.reload_interval`` seconds a :class:`Watcher` thread resolves each alias again; when
one has moved, its new version is downloaded, checked against the checksum recorded at
registration (before anything of it is deserialised), loaded, made to answer its own input
example, and only then swapped in: one assignment of ``current``, so a request uses the old
version or the new one, whole, and never waits for a load. A version that fails any of that is
not served: the old one keeps answering, the failure is logged as an ERROR and written as an
alert to the prediction log's store (``mlops_alerts``), and the version is not tried again
until the alias names another one.

A replaced version is closed (its prediction log flushed, its files removed) once no request
and no shadow scoring uses it any more.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc.scoring_server import SERVING_MODEL_CONFIG

from mlops.artifacts import download_model, verify_model_dir, verify_registered
from mlops.serving.metrics import Meter, ServerMetrics

logger = logging.getLogger(__name__)

JSON = "application/json"
PINNED = "pinned"  # the alias label of a version served by number (mlops serve --version)
RELOAD_RULE = "serving_reload"  # the alert's rule when a new version is refused


class Served:
    """One loaded version of a registered model, answering for one alias (or shadowing it)."""

    def __init__(
        self, name: str, arm: str, version: str, model: Any, directory: Path, meter: Meter
    ) -> None:
        self.name, self.arm, self.version = name, arm, version
        self.model, self.directory, self.meter = model, directory, meter
        self.wrapper = model.unwrap_python_model()
        self.input_schema = model.metadata.get_input_schema()
        self.max_body_bytes = int(self.wrapper.max_body_bytes)
        # what a shadow compares to reuse the rows another version parsed
        self.columns = (tuple(self.wrapper.numeric), tuple(self.wrapper.categorical))
        self._users = 0
        self._closed = False
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """Count one user (a request, a shadow scoring); False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1

    def close_if_idle(self, metrics: ServerMetrics) -> bool:
        """Close this version if nothing uses it: flush its prediction log, remove its files."""
        with self._lock:
            if self._users:
                return False
            self._closed = True
        if self.wrapper.monitor is not None:
            self.wrapper.monitor.close(timeout=5.0)
        metrics.sync_logs()  # its last written and dropped rows
        shutil.rmtree(self.directory, ignore_errors=True)
        return True


class Loader:
    """Loads versions of one registered model as the server is configured to serve them."""

    def __init__(
        self, name: str, model_config: dict[str, Any], root: Path, metrics: ServerMetrics
    ) -> None:
        self.name = name
        # MLflow's way to give a served model its config (`mlflow models serve` sets it), then
        # the server's options
        given = {**json.loads(os.environ.get(SERVING_MODEL_CONFIG) or "{}"), **model_config}
        self.model_config = {k: v for k, v in given.items() if v not in (None, "")}
        self.root = root
        self.metrics = metrics
        self.client = mlflow.MlflowClient()
        self._bundle: tuple[Path, str, str] | None = None

    def bundle(self, folder: str | os.PathLike[str], checksum: str, version: str) -> None:
        """Serve ``version`` from the files in ``folder`` (a serving image's), verified against
        ``checksum`` instead of the registry's record."""
        self._bundle = (Path(folder), checksum, str(version))

    def resolve(self, alias: str) -> str:
        return str(self.client.get_model_version_by_alias(self.name, alias).version)

    def load(
        self, version: str, *, arm: str, shadow: bool = False, monitor: bool = False
    ) -> Served:
        """Download, verify, load and warm up ``version``; its prediction log (``monitor``, or
        the model's own setting; always for a ``shadow``) names ``arm``."""
        from mlops.serving.wrapper import DEFAULT_OPTIONS

        directory = Path(tempfile.mkdtemp(prefix=f"v{version}-", dir=self.root))
        try:
            if self._bundle is not None and self._bundle[2] == str(version):
                local, checksum, _ = self._bundle  # left in place: ``directory`` stays empty
                verify_model_dir(local, checksum, f"{self.name} version {version}")
            else:
                local = download_model(self.name, version, directory)
                verify_registered(self.name, version, local)  # before MLflow reads any of it
            config = {**self.model_config, "model_name": self.name, "model_version": version}
            if self._bundle is not None and self._bundle[2] == str(version):
                config["model_checksum"] = self._bundle[1]  # verified just now: no registry
            model = mlflow.pyfunc.load_model(
                str(local), model_config={**config, "monitoring": False}
            )
            wrapper = model.unwrap_python_model()
            if not callable(getattr(wrapper, "respond", None)):
                raise TypeError(
                    "it is not a model logged by mlops (mlops.serving.MlopsModel); serve it with "
                    "`mlflow models serve`"
                )
            warm_up(model, wrapper, local)
            # the model's logged serving options, then the server's
            options = {**DEFAULT_OPTIONS, **(wrapper.meta.get("serving") or {}), **config}
            if shadow or monitor or _truthy(options["monitoring"]):
                wrapper.enable_monitoring(
                    self.log_url(options["monitoring_url"]),
                    sensitive=options["sensitive_columns"] or (),
                    sensitive_mode=options["sensitive_mode"] or "hash",
                    mask_key_env=options["mask_key_env"] or DEFAULT_OPTIONS["mask_key_env"],
                    capacity=int(
                        options["monitoring_queue_rows"] or DEFAULT_OPTIONS["monitoring_queue_rows"]
                    ),
                    arm=None if arm == PINNED else arm,
                    shadow=shadow,
                )
                self.metrics.track_log(wrapper.monitor)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return Served(
            self.name, arm, version, model, directory, self.metrics.meter(self.name, arm, version)
        )

    def log_url(self, configured: str | None = None) -> str:
        """The prediction log's URL: ``configured`` (the model's, overridden by ``--log-url``),
        else ``--log-url``, else beside the tracking store, as the wrapper resolves it."""
        from mlops.monitoring.store import LOG_FILE
        from mlops.tracking import project_store_url

        given = configured or self.model_config.get("monitoring_url")
        return project_store_url(given or None, LOG_FILE)

    def alert(self, served: Served, version: str, reason: str) -> None:
        """Write the refusal of ``version`` as an alert where ``served`` logs its predictions."""
        from mlops.monitoring.store import Alert, MonitoringStore

        monitor = served.wrapper.monitor
        url = monitor.url if monitor is not None else self.log_url()
        message = (
            f"{self.name} v{version} (now @{served.arm}) was not served: {reason}; "
            f"v{served.version} goes on serving"
        )
        try:
            store = MonitoringStore(url)
            try:
                store.add_alert(
                    Alert(
                        at=time.time(),
                        model=self.name,
                        version=version,
                        rule=RELOAD_RULE,
                        metric="reload_failed",
                        value=1.0,
                        threshold=0.0,
                        message=message[:2000],
                        action=f"kept serving version {served.version}",
                    )
                )
            finally:
                store.engine.dispose()
        except Exception as exc:  # noqa: BLE001 - the refusal stands; only its record failed
            logger.error("could not write the alert for %s v%s: %s", self.name, version, exc)


def _truthy(value: Any) -> bool:
    return value.strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


def warm_up(model: Any, wrapper: Any, local: Path) -> None:
    """Answer the version's own input example through the request path, or raise."""
    from mlflow.models import Model

    example = Model.load(str(local / "MLmodel")).get_serving_input(str(local))
    if example is None:
        logger.warning("%s has no input example: loaded without a trial answer", local.name)
        return
    answered = json.loads(wrapper.respond(example.encode(), JSON))["predictions"]
    if not answered:
        raise ValueError("it answered its input example with no rows")


class AliasFollower:
    """The version an alias names, loaded and kept current (or one version, pinned)."""

    def __init__(
        self,
        loader: Loader,
        arm: str,
        *,
        pinned: str | None = None,
        shadow: bool = False,
        monitor: bool = False,
    ) -> None:
        self.loader, self.arm, self.pinned = loader, arm, pinned
        self.shadow, self.monitor = shadow, monitor
        self.current: Served
        self._refused: set[str] = set()
        self._retired: list[Served] = []
        self._unreachable = False

    def start(self) -> None:
        """Load the version the alias names now (raises if it cannot be served)."""
        version = self.pinned or self.loader.resolve(self.arm)
        self.current = self._load(version)
        self.loader.metrics.loaded(self.loader.name, self.arm, version)
        logger.info("serving %s v%s %s", self.loader.name, version, self._role())

    def acquire(self) -> Served:
        """The current version, counted as in use until its ``release``."""
        while True:
            served = self.current
            if served.acquire():
                return served

    def poll(self) -> None:
        """Resolve the alias; if it moved, load, verify and warm up its version, then swap."""
        if self.pinned:
            return
        name, current = self.loader.name, self.current
        try:
            version = self.loader.resolve(self.arm)
        except Exception as exc:  # noqa: BLE001 - the registry is down or the alias gone: keep serving
            if not self._unreachable:
                logger.warning(
                    "could not resolve %s@%s (%s); v%s goes on serving",
                    name,
                    self.arm,
                    exc,
                    current.version,
                )
            self._unreachable = True
            return
        self._unreachable = False
        if version == current.version:
            self._refused.clear()  # moved back: a later move to a refused version is tried again
            return
        if version in self._refused:
            return
        started = time.monotonic()
        try:
            new = self._load(version)
        except Exception as exc:  # noqa: BLE001 - any failure: the version is not served
            reason = str(exc).splitlines()[0][:500] if str(exc) else exc.__class__.__name__
            self._refused.add(version)
            self.loader.metrics.reloaded(name, self.arm, ok=False)
            logger.error(
                "%s@%s moved to v%s, which is NOT served: %s; v%s goes on serving",
                name,
                self.arm,
                version,
                reason,
                current.version,
            )
            self.loader.alert(current, version, reason)
            return
        self.current = new  # the swap: requests from now on get the new version
        self._retired.append(current)
        self.loader.metrics.loaded(name, self.arm, version)
        self.loader.metrics.reloaded(name, self.arm, ok=True)
        logger.info(
            "%s@%s moved from v%s to v%s: now serving v%s %s (loaded in %.1f s)",
            name,
            self.arm,
            current.version,
            version,
            version,
            self._role(),
            time.monotonic() - started,
        )

    def retire(self) -> None:
        """Close the replaced versions nothing uses any more."""
        self._retired = [s for s in self._retired if not s.close_if_idle(self.loader.metrics)]

    def close(self) -> None:
        for served in [*self._retired, self.current]:
            served.close_if_idle(self.loader.metrics)

    def _load(self, version: str) -> Served:
        return self.loader.load(version, arm=self.arm, shadow=self.shadow, monitor=self.monitor)

    def _role(self) -> str:
        if self.pinned:
            return "(pinned: not following any alias)"
        return f"for @{self.arm}" + (
            " as a shadow (its answers reach no client)" if self.shadow else ""
        )


class Watcher:
    """A daemon thread polling every follower each ``interval`` seconds."""

    def __init__(
        self, followers: Iterable[AliasFollower], interval: float, on_tick: Callable[[], None]
    ) -> None:
        self.followers = list(followers)
        self.interval = interval
        self.on_tick = on_tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlops-registry-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for follower in self.followers:
                if self._stop.is_set():
                    return
                try:
                    follower.poll()
                    follower.retire()
                except Exception:  # noqa: BLE001 - the watch must go on
                    logger.exception("following %s@%s failed", follower.loader.name, follower.arm)
            self.on_tick()
