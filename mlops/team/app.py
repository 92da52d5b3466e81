"""The team server's auth app: MLflow's basic-auth with the project's promotion policy and audit
trail enforced on the server, whichever client makes the request.

Registered as the ``mlops`` app through MLflow's ``mlflow.app`` entry point and started with
``mlflow server --app-name mlops`` (``mlops server`` does that). It is basic-auth itself
(:func:`mlflow.server.auth.create_app`: users, permissions, the admin API, the login) with one
hook of its own in front of basic-auth's, for every request that moves a registered model's
alias or stage (``/api/2.0/mlflow/registered-models/alias`` POST and DELETE,
``/api/2.0/mlflow/model-versions/transition-stage``, and their ``/ajax-api`` twins the UI uses):

- moving ``production`` (setting or deleting the alias, a transition to or out of the
  ``Production`` stage) needs MANAGE on the registered model, ``staging`` needs EDIT, an admin
  may do anything; any other alias is left to basic-auth;
- each such request is one audit row in the server's own database, written under a per-model
  lock before the change is made (``pending``) and settled once the server has answered
  (``done``, ``refused`` or ``failed``): who (the authenticated user), when (the server's
  clock), the version before and after, and the client's reason (header ``X-Mlops-Reason``,
  percent-encoded UTF-8); a refusal by the policy is a ``refused`` row and a 403 that names the
  permission needed.

``mlops promote`` and ``mlops rollback`` run their gates in the client and then declare the move
they make (``X-Mlops-Action``, ``X-Mlops-Target``, ``X-Mlops-Version``, ``X-Mlops-Gates``,
``X-Mlops-Forced``; see :mod:`mlops.registry.remote`); the server records the declared action
for the request that makes that move. What follows a move of ``production`` or ``staging``
(the legacy stages mirrored, the replaced version archived and marked, a staging alias that
production used up removed) the server does itself, under the model's lock and before the row
is settled, whichever client set the alias; if it fails, the alias is put back, the row is
``failed`` and the answer a 409 (MLflow's client retries a 503). The trail's answer says so
(``mirrors_stages``), and ``mlops promote`` then moves only the alias. A declaration is the
client's word: it names the action and the gate results in the row but grants nothing: the
permission check is the same for every client.

A move that was made, and a promotion whose gates refused it, also leave the one-line
``mlops.last_change`` tag on the version they name, set by the server with the row (whichever
client moved it). ``/api/2.0/mlops/model-versions/files`` answers a version's files in one
tar (READ on the model; :mod:`mlops.team.files`).

``/api/2.0/mlops/audit`` (and ``/ajax-api/...``) is the trail's API: ``GET ?name=MODEL`` lists
a model's rows (READ on the model; ``&last=N``: the newest N); ``POST`` records what a client
did that moved no alias (a promotion its gates refused, a production server starting or
stopping a split or a shadow),
stamped with the authenticated user and the server's clock. Clients never reach the database.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import urllib.parse
from contextlib import ExitStack
from typing import Any

from flask import Flask, Response, g, request

from mlops.db import scrub
from mlops.errors import first_line
from mlops.registry.audit import (
    DONE,
    FAILED,
    LAST_CHANGE_TAG,
    PENDING,
    REFUSED,
    TRAFFIC_ACTIONS,
    AuditLog,
    AuditRecord,
    last_change,
)
from mlops.team import files

logger = logging.getLogger(__name__)

AUDIT_URL_ENV = "MLOPS_AUDIT_URL"  # the server's audit database (default: its backend store)
BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"  # mlflow server's own variable for --backend-store-uri
PRODUCTION, STAGING = "production", "staging"

_PREFIXES = ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/")
ALIAS_PATHS = frozenset(p + "registered-models/alias" for p in _PREFIXES)
STAGE_PATHS = frozenset(p + "model-versions/transition-stage" for p in _PREFIXES)
RENAME_PATHS = frozenset(p + "registered-models/rename" for p in _PREFIXES)
DELETE_VERSION_PATHS = frozenset(p + "model-versions/delete" for p in _PREFIXES)
DELETE_MODEL_PATHS = frozenset(p + "registered-models/delete" for p in _PREFIXES)
_GUARDED_ALIASES = ("production", "staging")
_CONTROL = {c: " " for c in [*range(0x00, 0x20), 0x7F]}  # no line breaks or NULs in a row
AUDIT_PATHS = frozenset(("/api/2.0/mlops/audit", "/ajax-api/2.0/mlops/audit"))

# what a client may declare about its move (request headers)
ACTION_HEADER = "X-Mlops-Action"
REASON_HEADER = "X-Mlops-Reason"
TARGET_HEADER = "X-Mlops-Target"
VERSION_HEADER = "X-Mlops-Version"
GATES_HEADER = "X-Mlops-Gates"
FORCED_HEADER = "X-Mlops-Forced"
DECLARED_ACTIONS = ("promote", "rollback")
REPORTED_ACTIONS = (*DECLARED_ACTIONS, *TRAFFIC_ACTIONS)  # what POST /mlops/audit accepts

_LOCK_TIMEOUT_S = 30.0
_MAX_REASON = 1000
_MAX_GATES = 50


class Move:
    """One request that moves an alias or a stage, as the audit trail names it."""

    def __init__(
        self,
        kind: str,
        model: str,
        target: str,
        to_version: str | None,
        needs: str | None,
        detail: str | None = None,
    ):
        self.kind, self.model, self.target, self.to_version = kind, model, target, to_version
        self.needs = needs  # MANAGE, EDIT, or None: basic-auth decides alone
        self.detail = detail


def create_app(app: Flask | None = None) -> Any:
    """The ``mlops`` app for ``mlflow server --app-name mlops``: basic-auth, with the policy
    hook registered ahead of basic-auth's own."""
    from mlflow.server import app as mlflow_app
    from mlflow.server.auth import create_app as basic_auth

    app = app or mlflow_app
    policy = Policy(_audit_url())
    app.before_request(policy.before)
    app.after_request(policy.after)
    app.teardown_request(policy.teardown)
    return basic_auth(app)


def _audit_url() -> str:
    url = os.environ.get(AUDIT_URL_ENV) or os.environ.get(BACKEND_ENV)
    if not url:
        raise RuntimeError(
            f"the mlops app needs the server's database: set {BACKEND_ENV} (as `mlops server` "
            f"does) or {AUDIT_URL_ENV}"
        )
    return url


@functools.cache
def _registry() -> Any:
    """A client of the server's own registry, read directly from its database."""
    import mlflow

    url = os.environ.get(BACKEND_ENV) or _audit_url()
    return mlflow.MlflowClient(tracking_uri=url, registry_uri=url)


class Policy:
    """The hook: authorise moves of production and staging, audit every move, serve the API."""

    def __init__(self, audit_url: str) -> None:
        self.audit = AuditLog(audit_url)

    # ---- the hooks ----
    def before(self) -> Response | None:
        if request.path in AUDIT_PATHS:
            return self._audit_api()
        if request.path in files.FILES_PATHS:
            return self._files_api()
        if request.method == "DELETE" and request.args and request.content_length:
            # MLflow's handlers read a DELETE's parameters from its body, basic-auth from its
            # query string when the body is not declared JSON: with both, the permission
            # checked and the resource deleted could differ
            return _error(
                400,
                "INVALID_PARAMETER_VALUE",
                "a DELETE carries its parameters in a JSON body or in the query string, not both",
            )
        try:
            move = _move_of(request)
        except _BadRequest as exc:
            return _error(400, "INVALID_PARAMETER_VALUE", str(exc))
        if move is None:
            return None
        try:
            return self._guard(move)
        except Exception as exc:  # noqa: BLE001 - audit first: no row, no change
            logger.exception("the audit row of a move of %s could not be written", move.model)
            g.pop("mlops_intent", None)
            return _error(
                503,
                "TEMPORARILY_UNAVAILABLE",
                f"the audit row could not be written ({exc.__class__.__name__}); nothing changed",
            )

    def _guard(self, move: Move) -> Response | None:
        user = _user()
        if user is None:
            return None  # basic-auth answers 401; nobody to name in a row
        stack = ExitStack()
        held = stack.enter_context(self.audit.lock(move.model, user, timeout=_LOCK_TIMEOUT_S))
        if not held:
            stack.close()
            return _error(
                503,
                "TEMPORARILY_UNAVAILABLE",
                f"another change of {move.model} is in progress; try again",
            )
        g.mlops_lock = stack
        self._settle_interrupted(move.model)
        row = self._row(move, user)
        refusal = self._refusal(move, user)
        if refusal is not None:
            row["detail"] = "; ".join(filter(None, [refusal, row["detail"]]))
            record = self.audit.record(outcome=REFUSED, **row)
            logger.warning("refused (audit #%d): %s", record.id, refusal)
            return _error(403, "PERMISSION_DENIED", f"{refusal} (audit #{record.id})")
        g.mlops_intent = self.audit.record(outcome=PENDING, **row)
        return None

    def after(self, response: Response) -> Response:
        intent: AuditRecord | None = g.pop("mlops_intent", None)
        if intent is not None:
            status = response.status_code
            if 200 <= status < 300:
                outcome, detail = DONE, None
            else:
                outcome = REFUSED if status in (401, 403) else FAILED
                detail = _clean(f"HTTP {status}: {_message(response)}", 2000)
            if outcome == DONE and intent.action in _MOVES:
                try:
                    outcome, detail, error = _follow(intent)
                except Exception as exc:  # noqa: BLE001 - no registry client: say so, settle
                    outcome = FAILED
                    error = f"the move's follow-up could not start ({_first_line(exc)})"
                    detail = _clean(error, 2000)
                if error is not None:
                    logger.warning("audit #%d: %s", intent.id, error)
                    # 409, not 503: MLflow's client retries a 503, which would move it again
                    response = _error(409, "INVALID_STATE", f"{error} (audit #{intent.id})")
            try:
                settled = self.audit.settle(intent.id, outcome, detail)
                if outcome == DONE:  # a refused attempt changes nothing, not even a tag
                    _tag(settled)
            except Exception as exc:  # noqa: BLE001 - the answer stands; the next move settles it
                logger.warning("audit #%d stays pending: %s", intent.id, exc)
        return response

    def teardown(self, _exc: BaseException | None) -> None:
        intent: AuditRecord | None = g.pop("mlops_intent", None)
        if intent is not None:  # the request raised past the handlers: no answer was sent
            try:
                self.audit.settle(intent.id, FAILED, "the server failed while handling it")
            except Exception as exc:  # noqa: BLE001
                logger.warning("audit #%d stays pending: %s", intent.id, exc)
        stack: ExitStack | None = g.pop("mlops_lock", None)
        if stack is not None:
            stack.close()

    # ---- deciding ----
    def _refusal(self, move: Move, user: str) -> str | None:
        """Why the policy refuses ``user`` this move, or None."""
        if move.needs is None or _is_admin(user):
            return None
        permission = _model_permission(move.model, user)
        has = getattr(permission, "name", "NO_PERMISSIONS")
        enough = permission.can_manage if move.needs == "MANAGE" else permission.can_update
        if enough:
            return None
        what = {
            "transition": f"the stage transition to {move.target} of {move.model}",
            "rename": f"renaming {move.model}, which holds {move.target}",
            "version_delete": f"deleting version {move.to_version} of {move.model}, which holds "
            f"{move.target}",
            "model_delete": f"deleting {move.model}, which holds {move.target}",
        }.get(move.kind, f"moving {move.target} of {move.model}")
        return (
            f"{what} needs {move.needs} on registered model {move.model!r}; user {user!r} has "
            f"{has}. Ask an admin or a user with MANAGE on the model to grant it, or to make "
            "the move"
        )

    def _row(self, move: Move, user: str) -> dict[str, Any]:
        """The audit row's values for ``move`` by ``user``, with what the client declared."""
        headers = request.headers
        declared = headers.get(ACTION_HEADER, "").strip().lower()
        reason = _decoded(headers.get(REASON_HEADER))
        matches = (
            declared in DECLARED_ACTIONS
            and move.kind == "alias_set"
            and headers.get(TARGET_HEADER) == move.target
            and headers.get(VERSION_HEADER) == move.to_version
        )
        gates = _gates(headers.get(GATES_HEADER)) if matches else []
        return dict(
            who=user,
            action=declared if matches else move.kind,
            model=_clean(move.model, 256),
            target=_clean(move.target, 20),
            from_version=_current(move),
            to_version=_clean(move.to_version, 20),
            reason=reason,
            forced=matches and headers.get(FORCED_HEADER, "").lower() == "true",
            gates=gates,
            detail=move.detail,
        )

    def _settle_interrupted(self, model: str) -> None:
        """Rows a server left pending (it died mid-request), settled by what the registry says."""
        for record in self.audit.records(model, outcome=PENDING):
            if record.action in TRAFFIC_ACTIONS:
                continue
            move = Move("alias_set", model, record.target, record.to_version, None)
            now = _current(move) if not record.target.startswith("stage ") else None
            moved = now == record.to_version and now is not None
            detail = "settled by the server after an interrupted request"
            if moved and record.action in _MOVES and record.target in _GUARDED_ALIASES:
                try:  # finish what follows the move (all of it idempotent)
                    detail += "; then: " + _followed(_after_move(record))
                except Exception as exc:  # noqa: BLE001 - the next move mirrors again
                    detail += f"; its follow-up failed ({_first_line(exc)})"
            try:
                self.audit.settle(record.id, DONE if moved else FAILED, _clean(detail, 2000))
            except Exception as exc:  # noqa: BLE001 - another worker settled it first
                logger.info("audit #%d: %s", record.id, exc)

    # ---- the trail's API ----
    def _audit_api(self) -> Response:
        user = _user()
        if user is None:
            from mlflow.server.auth import make_basic_auth_response

            return make_basic_auth_response()
        try:
            body: dict[str, Any] = {}
            if request.method == "GET":
                name = request.args.get("name", "")
            elif request.method == "POST":
                sent = request.get_json(silent=True)
                if not isinstance(sent, dict):
                    raise _BadRequest("the body must be a JSON object")
                body, name = sent, sent.get("name", "")
            else:
                return _error(405, "BAD_REQUEST", "use GET (read the trail) or POST (report)")
            if not isinstance(name, str) or not name:
                raise _BadRequest("'name' (the registered model) is required")
            admin = _is_admin(user)
            permission = None if admin else _model_permission(name, user)
            if permission is not None and not permission.can_read:
                return _error(
                    403,
                    "PERMISSION_DENIED",
                    f"reading or reporting to the audit trail of {name!r} needs READ on it",
                )
            if request.method == "POST":
                # a refused promotion is reported by who could have promoted (EDIT); a server's
                # split or shadow by its serving user, who reads the registry (READ)
                if body.get("action") in DECLARED_ACTIONS and not (
                    permission is None or permission.can_update
                ):
                    return _error(
                        403,
                        "PERMISSION_DENIED",
                        f"reporting a {body.get('action')} of {name!r} needs EDIT on it",
                    )
                try:
                    _registry().get_registered_model(name)
                except Exception:  # noqa: BLE001 - no trail for a model that does not exist
                    return _error(
                        404, "RESOURCE_DOES_NOT_EXIST", f"no registered model named {name!r}"
                    )
            if request.method == "GET":
                rows = [r.as_json() for r in self.audit.records(name, last=_last(request.args))]
                # mirrors_stages: a client moves only the alias; the server does what follows
                answer = {"records": rows, "mirrors_stages": True}
                return Response(json.dumps(answer), 200, mimetype="application/json")
            record = self.audit.record(who=user, model=name, **_reported(body))
            _tag(record)
        except _BadRequest as exc:
            return _error(400, "INVALID_PARAMETER_VALUE", str(exc))
        return Response(json.dumps({"record": record.as_json()}), 200, mimetype="application/json")

    # ---- a version's files in one answer (mlops.team.files) ----
    def _files_api(self) -> Response:
        user = _user()
        if user is None:
            from mlflow.server.auth import make_basic_auth_response

            return make_basic_auth_response()
        try:
            response = self._files(user)
        except files.FilesRefused as exc:
            response = _error(exc.status, exc.code, str(exc))
        response.headers[files.MARK_HEADER] = "1"
        return response

    def _files(self, user: str) -> Response:
        from mlflow.exceptions import MlflowException
        from mlflow.server import ARTIFACTS_DESTINATION_ENV_VAR

        if request.method != "GET":
            raise files.FilesRefused(405, "BAD_REQUEST", "use GET")
        name, version = files.parameters(request.args)
        admin = _is_admin(user)
        if not admin and not _model_permission(name, user).can_read:
            raise files.FilesRefused(
                403, "PERMISSION_DENIED", f"reading the files of {name!r} needs READ on it"
            )
        try:
            uri = _registry().get_model_version_download_uri(name, version)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise files.FilesRefused(
                    503, "TEMPORARILY_UNAVAILABLE", "the registry did not answer; try again"
                ) from None
            raise files.FilesRefused(
                404,
                "RESOURCE_DOES_NOT_EXIST",
                f"registered model {name!r} has no version {version}",
            ) from None
        if not os.environ.get(ARTIFACTS_DESTINATION_ENV_VAR):
            raise files.FilesRefused(
                409, "INVALID_STATE", "this server does not proxy artifacts (--serve-artifacts)"
            )
        path = files.proxied_path(uri)
        # the files are the experiment's artifacts too: MLflow's proxy would ask READ on it
        experiment = path.split("/", 1)[0]
        if not admin and not _experiment_permission(experiment, user).can_read:
            raise files.FilesRefused(
                403,
                "PERMISSION_DENIED",
                f"reading the files of {name!r} needs READ on experiment {experiment}",
            )
        try:
            body = files.archive(os.environ[ARTIFACTS_DESTINATION_ENV_VAR], path)
        except files.FilesRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - the store's failure, not the request's
            logger.warning("the files of %s version %s could not be read: %s", name, version, exc)
            raise files.FilesRefused(
                503,
                "TEMPORARILY_UNAVAILABLE",
                f"the artifact store did not answer ({exc.__class__.__name__}); try again",
            ) from None
        return Response(body, 200, mimetype="application/x-tar")


# the moves the server tags and follows up (not the stage mirroring that follows them)
_MOVES = (*DECLARED_ACTIONS, "alias_set")
MIRRORED = "the server then: "  # the detail of a move the server followed up


def _after_move(intent: AuditRecord) -> list[str]:
    """:func:`mlops.registry.promotion._after_move` for the move ``intent`` records."""
    from mlops.registry import promotion

    assert intent.to_version is not None
    return promotion._after_move(
        _registry(),
        intent.model,
        intent.target,
        intent.to_version,
        intent.from_version,
        rollback=intent.action == "rollback",
    )


def _followed(done: list[str]) -> str:
    return "; ".join(done) or "nothing to change"


def _follow(intent: AuditRecord) -> tuple[str, str | None, str | None]:
    """What follows a move of production or staging, done by the server under the model's lock
    before the row is settled, whichever client set the alias: the legacy stages mirrored (the
    new version's, unless production holds it, and the replaced one's archived or cleared), the
    replaced version marked, and a staging alias that production used up removed (the same code
    a local promotion runs). The row's detail says what was done.

    Returns the row's outcome and detail, and the error to answer (None when all went well). A
    failure puts the alias back (the row ``failed``: nothing changed) and the stages in line
    with the aliases again; if the alias cannot be put back either, the move stands (``done``)
    and the error says so.
    """
    from mlops.registry import promotion

    model, target = intent.model, intent.target
    if target not in (PRODUCTION, STAGING) or not intent.to_version:
        return DONE, None, None
    try:
        return DONE, MIRRORED + _followed(_after_move(intent)), None
    except Exception as exc:  # noqa: BLE001 - put the alias back, say what happened
        failure = _first_line(exc)
    client = _registry()
    try:
        if intent.from_version:
            client.set_registered_model_alias(model, target, intent.from_version)
        else:
            client.delete_registered_model_alias(model, target)
    except Exception as exc:  # noqa: BLE001 - the move stands, its follow-up did not happen
        detail = _clean(
            f"moved, but the legacy stages could not be mirrored ({failure}), and putting "
            f"{target} back failed too ({_first_line(exc)})",
            2000,
        )
        return DONE, detail, f"{target} of {model} is now version {intent.to_version}: {detail}"
    try:  # a half-done mirror: the stages in line with the aliases again (best effort; the
        # row above says what happened, so these transitions have none of their own)
        promotion._mirror_stages(client, None, model, promotion._aliases(client, model), "")
    except Exception as exc:  # noqa: BLE001 - the next move of this model mirrors again
        logger.warning("%s: the stages stay out of line with the aliases: %s", model, exc)
    back = intent.from_version or "none"
    detail = _clean(
        f"the legacy stages could not be mirrored ({failure}); {target} put back to {back}", 2000
    )
    return FAILED, detail, f"{target} of {model} is unchanged: {detail}"


def _first_line(exc: BaseException) -> str:
    """The error's first line, without the database's password: it goes into an audit row, a
    log line and an answer."""
    line = scrub(first_line(exc, None), os.environ.get(BACKEND_ENV), os.environ.get(AUDIT_URL_ENV))
    return line[:300]  # cut after scrubbing: a URL across the cut is still found whole


def _tag(record: AuditRecord) -> None:
    """The ``mlops.last_change`` tag on the version a promotion, rollback or alias move names,
    set by the server as it writes the row, whichever client moved it: a move that was made,
    or a promotion its gates refused as reported by a user with EDIT (best effort)."""
    if record.action not in _MOVES or not record.to_version:
        return
    try:
        _registry().set_model_version_tag(
            record.model, record.to_version, LAST_CHANGE_TAG, last_change(record)
        )
    except Exception as exc:  # noqa: BLE001 - the row stands; the tag is a convenience
        logger.warning("audit #%d: the %s tag was not set: %s", record.id, LAST_CHANGE_TAG, exc)


def _last(args: Any) -> int | None:
    """``last=N`` of a trail read: only the newest N rows (1 to 1000); absent: all."""
    text = args.get("last")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 1000):
        raise _BadRequest(f"'last' must be a whole number from 1 to 1000, not {text[:20]!r}")
    return int(text)


class _BadRequest(ValueError):
    pass


def _move_of(req: Any) -> Move | None:
    """The alias or stage move ``req`` asks for (a rename or a delete that takes a guarded alias
    with it included), or None if it moves nothing."""
    path, method = req.path, req.method
    if path in ALIAS_PATHS and method in ("POST", "DELETE"):
        args = _params(req)
        model, alias = _text(args, "name"), _text(args, "alias")
        if method == "POST":
            version, kind = _version(_text(args, "version")), "alias_set"
            if not alias.isascii():
                raise _BadRequest(
                    f"alias {alias!r}: this server takes aliases of ASCII letters, digits, _ "
                    "and - only (a lookalike of production or staging misleads its readers)"
                )
            if alias.strip().lower() in _GUARDED_ALIASES and alias not in _GUARDED_ALIASES:
                raise _BadRequest(
                    f"alias {alias!r}: write it {alias.strip().lower()!r} (a variant in other "
                    "letters or with spaces misleads its readers, and some databases take it "
                    "for the same alias)"
                )
        else:
            version, kind = None, "alias_delete"
        needs = {"production": "MANAGE", "staging": "EDIT"}.get(alias.strip().lower())
        detail = f"alias {_clean(alias, 300)}" if len(alias) > 20 else None
        return Move(kind, model, alias, version, needs, detail)
    if path in STAGE_PATHS and method == "POST":
        args = _params(req)
        model, version, stage = (
            _text(args, "name"),
            _version(_text(args, "version")),
            _text(args, "stage"),
        )
        wanted = stage.strip().lower()
        held = _stage_of(model, version)
        if "production" in (wanted, held):
            required: str | None = "MANAGE"
        elif "staging" in (wanted, held):
            required = "EDIT"
        else:
            required = None
        return Move("transition", model, f"stage {stage.strip().title()}"[:20], version, required)
    if path in RENAME_PATHS and method == "POST":
        args = _params(req)
        model, new_name = _text(args, "name"), _text(args, "new_name")
        held = _guarded_alias(model)
        if held is None:
            return None
        return Move("rename", model, held, None, "MANAGE", f"renamed to {_clean(new_name, 300)}")
    if path in DELETE_VERSION_PATHS and method == "DELETE":
        args = _params(req)
        model, version = _text(args, "name"), _text(args, "version")
        held = _guarded_alias(model, version)
        if held is None:
            return None
        return Move("version_delete", model, held, version, "MANAGE")
    if path in DELETE_MODEL_PATHS and method == "DELETE":
        model = _text(_params(req), "name")
        held = _guarded_alias(model)
        if held is None:
            return None
        return Move("model_delete", model, held, None, "MANAGE")
    return None


def _version(text: str) -> str:
    """A version number as the registry stores it (``"03"`` is version 3); anything but ASCII
    digits is refused here, before MLflow's own reading (which takes ``"1_0"`` for 10)."""
    if not text.isascii() or not text.isdigit():
        raise _BadRequest(f"'version' must be a version number (digits), got {text[:40]!r}")
    return str(int(text))


def _params(req: Any) -> dict[str, Any]:
    """The request's parameters as MLflow's handlers read them: the query string of a GET,
    else the body as JSON whatever its declared type (a JSON string holding JSON decoded)."""
    if req.method == "GET":
        return dict(req.args)
    body = req.get_json(force=True, silent=True)
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            body = None
    return body if isinstance(body, dict) else {}


def _guarded_alias(model: str, version: str | None = None) -> str | None:
    """``production`` or ``staging`` if the model (that version of it) holds the alias or
    the stage, else None."""
    try:
        found = _registry().get_registered_model(model)
    except Exception:  # noqa: BLE001 - no such model: the handler answers
        return None
    aliases = {str(a).lower(): str(v) for a, v in (found.aliases or {}).items()}
    for alias in _GUARDED_ALIASES:
        if alias in aliases and (version is None or aliases[alias] == str(version).lstrip("0")):
            return alias
    if version is not None:
        stage = _stage_of(model, version)
        return stage if stage in _GUARDED_ALIASES else None
    return None


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and key == "version":
        value = str(value)
    if not isinstance(value, str) or not value:
        raise _BadRequest(f"missing value for required parameter '{key}'")
    return value


def _user() -> str | None:
    from mlflow.server.auth import authenticate_request

    auth = authenticate_request()
    return getattr(auth, "username", None) if not isinstance(auth, Response) else None


def _is_admin(user: str) -> bool:
    from mlflow.server.auth import store

    try:
        return bool(store.get_user(user).is_admin)
    except Exception:  # noqa: BLE001 - an unknown user is no admin
        return False


def _model_permission(model: str, user: str) -> Any:
    """``user``'s permission on registered model ``model``: their own grant, else the
    server's default permission.

    Grants made through roles (MLflow 3.17's RBAC) are not seen here: the policy asks for a
    grant to the user, and refuses (never allows) when there is none.
    """
    from mlflow.server.auth import store

    return _granted(store.get_registered_model_permission, model, user)


def _experiment_permission(experiment_id: str, user: str) -> Any:
    """``user``'s permission on an experiment, as :func:`_model_permission` (a client refused
    the files endpoint falls back to MLflow's own download, which sees grants through roles)."""
    from mlflow.server.auth import store

    return _granted(store.get_experiment_permission, experiment_id, user)


def _granted(lookup: Any, resource: str, user: str) -> Any:
    """The permission ``lookup(resource, user)`` finds granted to the user, else the server's
    default."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth import auth_config
    from mlflow.server.auth.permissions import get_permission

    try:
        granted = lookup(resource, user).permission
    except MlflowException:  # no grant of the user's own on it
        granted = auth_config.default_permission
    return get_permission(granted)


def _current(move: Move) -> str | None:
    """The version the alias names now (None for a stage transition)."""
    if move.kind == "transition":
        return None
    try:
        return str(_registry().get_model_version_by_alias(move.model, move.target).version)
    except Exception:  # noqa: BLE001 - no such alias (or model): nothing before
        return None


def _stage_of(model: str, version: str) -> str | None:
    try:
        stage = _registry().get_model_version(model, version).current_stage
    except Exception:  # noqa: BLE001 - the handler answers for a missing version
        return None
    return str(stage).lower() if stage else None


def _decoded(value: str | None) -> str | None:
    if not value:
        return None
    return _clean(urllib.parse.unquote(value), _MAX_REASON) or None


def _clean(value: str | None, limit: int) -> str | None:
    """``value`` as a row keeps it: control characters (line breaks, NUL) as spaces, clipped."""
    if value is None:
        return None
    return str(value).translate(_CONTROL)[:limit]


def _gates(value: str | None) -> list[dict[str, Any]]:
    """The client's gate results (percent-encoded JSON list), kept only if well formed."""
    if not value:
        return []
    try:
        gates = json.loads(urllib.parse.unquote(value))
    except ValueError:
        return []
    if not isinstance(gates, list):
        return []
    return [
        {
            "gate": _clean(str(x.get("gate")), 100),
            "passed": x.get("passed") is True,  # a JSON true, not a truthy "false"
            **{k: _clean(str(x[k]), 300) for k in ("measured", "required") if k in x},
        }
        for x in gates[:_MAX_GATES]
        if isinstance(x, dict) and "gate" in x
    ]


def _reported(body: dict[str, Any]) -> dict[str, Any]:
    """A client's report (a refused promotion, a split or shadow) as audit row values."""
    action = body.get("action")
    if action not in REPORTED_ACTIONS:
        raise _BadRequest(f"'action' must be one of {', '.join(REPORTED_ACTIONS)}")
    traffic = action in TRAFFIC_ACTIONS
    detail = body.get("detail")
    if traffic and not (isinstance(detail, str) and detail.strip()):
        raise _BadRequest(f"{action}: 'detail' must say what is served")

    def text(key: str, limit: int = 20) -> str | None:
        value = body.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise _BadRequest(f"'{key}' must be a string")
        return _clean(value, limit)

    forced = body.get("forced", False)
    if not isinstance(forced, bool):
        raise _BadRequest("'forced' must be true or false (JSON booleans)")

    return dict(
        action=action,
        # a promotion's report is its refusal by the gates; the alias did not move
        outcome=DONE if traffic else REFUSED,
        target=text("target") or PRODUCTION,
        from_version=text("from_version"),
        to_version=text("to_version"),
        reason=text("reason", _MAX_REASON),
        forced=forced,
        gates=_gates(json.dumps(body.get("gates") or [])),
        detail=text("detail", 2000),
    )


def _message(response: Response) -> str:
    try:
        body = json.loads(response.get_data(as_text=True) or "{}")
        return str(body.get("message", ""))[:300] or response.status
    except ValueError:
        return response.status


def _error(status: int, code: str, message: str) -> Response:
    return Response(
        json.dumps({"error_code": code, "message": message}), status, mimetype="application/json"
    )
