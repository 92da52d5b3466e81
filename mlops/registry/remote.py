"""The audit trail kept by a team server (``mlops server``), seen from a client.

With ``MLFLOW_TRACKING_URI=http(s)://...`` and no ``registry.audit_url`` of its own, a command
writes no audit row itself and never reaches a database: the server's ``mlops`` app
(:mod:`mlops.team.app`) checks who may move the alias and writes the row in the same step.
The client runs its gates first and declares the move it then makes in request headers
(:class:`AuditHeaders`, a ``mlflow.request_header_provider`` plugin); what moved no alias (a
promotion the gates refused, a server starting a split) is reported through the app's
``/api/2.0/mlops/audit`` endpoint, which also serves the trail to ``mlops audit``.

:class:`ServerAudit` has the interface of :class:`mlops.registry.audit.AuditLog` that the
promotion code uses (``lock``, ``record``, ``settle``, ``records``).

A user of ``MlflowClient`` or ``curl`` gives a reason with the header ``X-Mlops-Reason``
(percent-encoded UTF-8); with the mlops package installed, ``MLOPS_AUDIT_REASON`` in the
environment adds it to every request MLflow's client makes.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import mlflow

from mlops.errors import RegistryError
from mlops.registry.audit import DONE, PENDING, REFUSED, TRAFFIC_ACTIONS, AuditRecord

AUDIT_ENDPOINT = "/api/2.0/mlops/audit"
REASON_ENV = "MLOPS_AUDIT_REASON"
_RECENT = 50  # rows read back to find the one the server wrote for a declared move
_GATES_LIMIT = 6000  # characters of percent-encoded gate results sent in a header

_declared = threading.local()


def server_audited(configured_url: str | None) -> bool:
    """Whether the audit trail is the tracking server's: an HTTP tracking URI and no audit
    store configured in the client."""
    if configured_url:
        return False
    return mlflow.get_tracking_uri().lower().startswith(("http://", "https://"))


class AuditHeaders:
    """MLflow request header provider: the move a promotion declares, and a reason."""

    def in_context(self) -> bool:
        return getattr(_declared, "move", None) is not None or bool(os.environ.get(REASON_ENV))

    def request_headers(self) -> dict[str, str]:
        move: dict[str, Any] | None = getattr(_declared, "move", None)
        reason = (move or {}).get("reason") or os.environ.get(REASON_ENV)
        headers = {"X-Mlops-Reason": _quote(reason)} if reason else {}
        if move is not None:
            gates = _quote(json.dumps(move["gates"]))
            headers.update(
                {
                    "X-Mlops-Action": move["action"],
                    "X-Mlops-Target": move["target"],
                    "X-Mlops-Version": move["to_version"],
                    "X-Mlops-Forced": "true" if move["forced"] else "false",
                    **({"X-Mlops-Gates": gates} if len(gates) <= _GATES_LIMIT else {}),
                }
            )
        return headers


class ServerAudit:
    """The tracking server's audit trail, reached through its ``mlops`` app."""

    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri.rstrip("/")
        # the server mirrors the legacy stages after an alias move itself (its trail says so)
        self.mirrors_stages = False

    @contextmanager
    def lock(self, model: str, holder: str, *, timeout: float | None = None) -> Iterator[bool]:
        """The server serialises the moves of a model itself; this checks it can audit them."""
        self.records(model, last=1)  # refuses now, before any gate runs, if it cannot audit
        yield True

    def record(self, *, outcome: str, **row: Any) -> AuditRecord:
        if outcome == PENDING:  # the server writes the row when the move's request arrives
            keys = ("action", "model", "target", "to_version", "reason")
            _declared.move = {k: row[k] for k in keys}
            _declared.move.update(forced=bool(row.get("forced")), gates=row.get("gates") or [])
            now = datetime.now(timezone.utc)
            return AuditRecord(id=0, at=now, outcome=PENDING, **row)
        if (outcome == REFUSED and row["action"] in ("promote", "rollback")) or (
            outcome == DONE and row["action"] in TRAFFIC_ACTIONS
        ):
            report = {k: v for k, v in row.items() if k not in ("who", "model")}
            body = self._call("POST", {"name": row["model"], **report})
            return AuditRecord.from_json(body["record"])
        raise RegistryError(
            f"a {row['action']} row ({outcome}) is written by the tracking server itself"
        )

    def settle(self, record_id: int, outcome: str, detail: str | None = None) -> AuditRecord:
        """The server settled the row when it answered: the declared move's row, as written."""
        move = getattr(_declared, "move", None)
        _declared.move = None
        if move is None:
            raise RegistryError("no move was declared to the tracking server")
        for record in reversed(self.records(move["model"], last=_RECENT)):
            if record.action == move["action"] and record.to_version == move["to_version"]:
                return record
        raise RegistryError(f"the tracking server recorded no {move['action']} row")

    def failed(self, exc: Exception) -> RegistryError:
        """The error for a declared move the server refused (403) or failed."""
        move = getattr(_declared, "move", None) or {}
        _declared.move = None
        text = (str(getattr(exc, "message", exc)).strip().splitlines() or [""])[0][:500]
        what = (
            f"{move.get('action')} of {move.get('model')} version {move.get('to_version')} to "
            f"{move.get('target')}"
        )
        if getattr(exc, "error_code", "") == "PERMISSION_DENIED":
            return RegistryError(f"{what} refused by the tracking server: {text}")
        return RegistryError(
            f"{what} failed on the tracking server: {text}; its audit trail has what happened "
            f"(mlops audit {move.get('model')})"
        )

    def records(self, model: str, *, last: int | None = None) -> list[AuditRecord]:
        """The model's trail, oldest first (with ``last``, its newest ``last`` rows)."""
        body = self._call("GET", {"name": model, **({"last": str(last)} if last else {})})
        self.mirrors_stages = body.get("mirrors_stages") is True
        return [AuditRecord.from_json(r) for r in body.get("records", [])]

    def _call(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        from mlflow.utils.rest_utils import MlflowHostCreds, http_request

        creds = MlflowHostCreds(
            self.uri,
            username=os.environ.get("MLFLOW_TRACKING_USERNAME"),
            password=os.environ.get("MLFLOW_TRACKING_PASSWORD"),
            token=os.environ.get("MLFLOW_TRACKING_TOKEN"),
            ignore_tls_verification=os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower()
            == "true",
            server_cert_path=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"),
        )
        kwargs: dict[str, Any] = (
            {"params": payload} if method == "GET" else {"json": json.loads(json.dumps(payload))}
        )
        try:
            response = http_request(creds, AUDIT_ENDPOINT, method, max_retries=2, **kwargs)
        except Exception as exc:  # noqa: BLE001 - unreachable: say which server
            raise RegistryError(
                f"the tracking server at {self.uri} cannot be reached for its audit trail: "
                f"{(str(exc).splitlines() or [''])[0][:200]}"
            ) from None
        if response.status_code == 404:
            raise RegistryError(
                f"the tracking server at {self.uri} keeps no mlops audit trail (it does not run "
                "the mlops app), so it cannot audit this change; start it with `mlops server`, "
                "or set registry.audit_url to an audit store of your own"
            )
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200:
            message = body.get("message") if isinstance(body, dict) else None
            raise RegistryError(
                f"the tracking server's audit trail answered HTTP {response.status_code}: "
                f"{message or response.text[:200]}"
            )
        return body if isinstance(body, dict) else {}


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="/:,.=-_()")
