"""The MLflow UI shows what mlops logged: a real `mlflow server` looked at with headless Chromium.

Content comes from the public CLI (train, tune, promote) into this test's own SQLite store; the
pages are checked on their rendered text, never on pixels. A PNG of each page is saved in the
test's tmp_path and, when MLOPS_UI_SCREENSHOTS names a folder, copied there.
Chromium and chromedriver come from Debian (`scripts/browser.sh`, run by `make test`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pytest

from tests.conftest import free_port, skip_or_fail
from tests.servers import BIN, running, server_env

pytestmark = pytest.mark.slow

MODEL = "ui-model"
WAIT_S = 60  # longest wait for a page to show its text


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    for path in (browser, driver):
        if not os.access(path, os.X_OK):
            skip_or_fail(f"{path} not installed (scripts/browser.sh installs Chromium)")
    return browser, driver


def _cli(*args: str) -> None:
    from mlops.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        if exc.code:
            pytest.fail(f"mlops {' '.join(args)} exited with {exc.code}")


@contextmanager
def _mlflow_server(uri: str, log: Path, timeout: float = 120) -> Iterator[str]:
    """`mlflow server` on ``uri``, on a free port, until it answers /health (it has no /ping)."""
    port = free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with running(command, server_env(uri), port, log, timeout=timeout, health="/health") as base:
        yield base


@contextmanager
def _browser(browser: str, driver: str) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


class Pages:
    """Opens pages, waits for text, screenshots each; collects what is missing instead of
    stopping."""

    def __init__(self, driver: Any, base: str, shots: Path) -> None:
        self.driver, self.base, self.shots = driver, base, shots
        self.problems: list[str] = []

    def body(self) -> str:
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        try:
            return self.driver.find_element(By.TAG_NAME, "body").text
        except WebDriverException:  # page re-rendering between two looks
            return ""

    def open(self, fragment: str) -> None:
        self.driver.get(f"{self.base}/#/{fragment}")

    def wait_for(
        self, page: str, texts: list[str], until: Callable[[], bool] | None = None
    ) -> bool:
        """Wait (bounded) until every text is on the page (and ``until()`` holds); record what is
        not."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        def shown(_: Any) -> bool:
            body = self.body()
            return all(text in body for text in texts) and (until is None or until())

        try:
            WebDriverWait(self.driver, WAIT_S, poll_frequency=0.25).until(shown)
            return True
        except TimeoutException:
            body = self.body()
            missing = [text for text in texts if text not in body]
            self.problems.append(
                f"{page}: after {WAIT_S}s missing {missing or '(a row-level check)'}; "
                f"page text begins: {body[:1500]!r}"
            )
            return False

    def close_assistant(self) -> None:
        """MLflow 3 opens an 'MLflow Assistant' side panel; close it so the tables get the width."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        for button in self.driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            try:
                if button.is_displayed():
                    button.click()
            except WebDriverException:
                pass

    def screenshot(self, name: str) -> None:
        time.sleep(0.5)  # let the last fetched rows paint before the picture
        self.driver.save_screenshot(str(self.shots / f"ui-{name}.png"))

    def row_text(self, css: str, label: str) -> str:
        """Text of the first ``css`` row whose text contains ``label`` ('' if none)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        try:
            for row in self.driver.find_elements(By.CSS_SELECTOR, css):
                text = row.text
                if label in text:
                    return text
        except WebDriverException:
            pass
        return ""


def _runs_page(pages: Pages, experiment_id: str, tune_run_id: str, family: str) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    trials = [f"trial-{i}" for i in range(3)]
    pages.open(f"experiments/{experiment_id}/runs")
    if not pages.wait_for("runs page", [f"train-{family}", f"tune-{family}"]):
        pages.screenshot("runs")
        return
    pages.close_assistant()
    if not all(trial in pages.body() for trial in trials):
        # Nested runs start collapsed under their parent: the parent's Run Name cell has a +/-
        # button.
        try:
            row = pages.driver.find_element(
                By.CSS_SELECTOR, f"[role='row'][row-id='{tune_run_id}']"
            )
            row.find_element(By.CSS_SELECTOR, "[col-id*='Run Name'] button").click()
        except WebDriverException as exc:
            pages.problems.append(
                f"runs page: no expand button on the tune parent row: {exc.__class__.__name__}"
            )
    pages.wait_for("runs page, tune parent expanded", trials)
    pages.screenshot("runs")


def _run_page(pages: Pages, experiment_id: str, run_id: str, family: str) -> None:
    pages.open(f"experiments/{experiment_id}/runs/{run_id}")
    pages.wait_for(
        "training run page",
        [f"train-{family}", "validation_accuracy", "test_accuracy", "model.family", family, MODEL],
    )
    pages.close_assistant()
    pages.screenshot("train-run")


def _model_page(pages: Pages, family: str) -> None:
    # The version table renders each alias as a tag reading "@ <alias>"; registration writes the
    # model's description ("<family> for classification, ...") and each version's ("<family>
    # (classification) ...").
    def on_their_versions() -> bool:
        v1, v2 = (
            pages.row_text("[role='row']", "Version 1"),
            pages.row_text("[role='row']", "Version 2"),
        )
        return (
            "@ staging" in v1
            and "@ production" in v2
            and all(f"{family} (classification)" in row for row in (v1, v2))
        )

    pages.open(f"models/{MODEL}")
    pages.wait_for(
        "registered model page",
        [
            MODEL,
            "Version 1",
            "Version 2",
            "@ staging",
            "@ production",
            f"{family} for classification",
            f"{family} (classification)",
        ],
        until=on_their_versions,
    )
    pages.close_assistant()
    pages.screenshot("model")


def test_mlflow_ui_shows_runs_trials_and_registered_model(
    tracking_uri: str, tmp_path: Path
) -> None:
    browser, driver = _chromium()
    try:
        import selenium  # noqa: F401
    except ImportError:
        skip_or_fail("selenium not installed (the `test` extra has it)")

    family = "logreg"
    _cli("train", "--model", family, "--register", "--set", f"registry.model_name={MODEL}")
    _cli(
        "tune",
        "--model",
        family,
        "--n-trials",
        "3",
        "--no-progress",
        "--set",
        f"registry.model_name={MODEL}",
    )
    _cli("promote", MODEL, "--version", "1", "--to", "staging", "--reason", "ui test")
    _cli("promote", MODEL, "--version", "2", "--to", "production", "--force", "--reason", "ui test")

    experiment = mlflow.get_experiment_by_name("mlops")
    assert experiment is not None

    def run_id(name: str) -> str:
        runs = mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.mlflow.runName = '{name}'",
            output_format="list",
        )
        assert len(runs) == 1, f"{len(runs)} runs named {name}"
        return runs[0].info.run_id

    train_id, tune_id = run_id(f"train-{family}"), run_id(f"tune-{family}")

    pages: Pages | None = None
    try:
        with (
            _mlflow_server(tracking_uri, tmp_path / "mlflow-server.log") as base,
            _browser(browser, driver) as chrome,
        ):
            pages = Pages(chrome, base, tmp_path)
            _runs_page(pages, experiment.experiment_id, tune_id, family)
            _run_page(pages, experiment.experiment_id, train_id, family)
            _model_page(pages, family)
    finally:
        target = os.environ.get("MLOPS_UI_SCREENSHOTS")
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            for shot in tmp_path.glob("ui-*.png"):
                shutil.copy(shot, Path(target) / shot.name)
    assert pages is not None
    if pages.problems:
        pytest.fail("the MLflow UI did not show:\n" + "\n".join(pages.problems), pytrace=False)
