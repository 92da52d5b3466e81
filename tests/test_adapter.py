"""The MLflow internals that mlops.serving.adapter relies on: checked against the installed MLflow.

These fail loudly, naming what changed, when an MLflow release moves them; they never fall
back quietly. The adapter itself degrades to MLflow's own path at run time (same answers,
slower), logging the same message.
"""

from __future__ import annotations

import inspect

import pytest
from mlflow.pyfunc import scoring_server

from mlops.serving import adapter


def test_installed_mlflow_has_what_the_fast_path_uses() -> None:
    adapter.check_mlflow()  # raises AdapterMismatch naming the change
    assert (
        tuple(inspect.signature(scoring_server.invocations).parameters)
        == adapter.INVOCATIONS_PARAMETERS
    )
    assert scoring_server.InvocationsResponse._fields == adapter.RESPONSE_FIELDS
    assert adapter.SERVER_MODEL_PATH_ENV == "__pyfunc_model_path__"


def test_a_changed_mlflow_is_reported_not_silently_bypassed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def invocations(body, content_type, model):  # noqa: ANN001, ANN202 - a "future" signature
        return None

    monkeypatch.setattr(scoring_server, "invocations", invocations)
    with pytest.raises(adapter.AdapterMismatch, match=r"no longer takes"):
        adapter.check_mlflow()

    class Wrapper:
        def respond(self, data: bytes | str, mime: str) -> str:
            return "{}"

    assert adapter.install_fast_path(Wrapper()) is False
    assert scoring_server.invocations is invocations  # left as it was


def test_content_type_parsing() -> None:
    assert adapter.parse_content_type("application/json; charset=UTF-8") == (
        "application/json",
        "utf-8",
    )
    assert adapter.parse_content_type("text/csv") == ("text/csv", "utf-8")
    assert adapter.parse_content_type("application/json; format=pandas-split") == ("", "")


def test_mlops_serve_flushes_on_the_asgi_lifespan_shutdown() -> None:
    """`mlops serve`'s shutdown path: pure ASGI lifespan, no framework event hook."""
    import asyncio

    from mlops.serving.server import GracefulShutdown

    calls: list[str] = []

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        calls.append(scope["type"])

    server = GracefulShutdown(app, lambda: calls.append("flushed"))
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        await server({"type": "http"}, receive, send)
        await server({"type": "lifespan"}, receive, send)

    asyncio.run(run())
    assert calls == ["http", "flushed"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
