"""Verify before load: model files are checked, and read without running code (issue 12).

An attacker who can write to the artifact store replaces a registered version's pipeline file
with a pickle whose ``__reduce__`` writes a marker file. Nothing that loads models may run it:
`mlflow.pyfunc.load_model`, `mlops serve` and `mlflow models serve` refuse the files, and the
marker stays absent.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
import skops.io as sio
from mlflow.exceptions import MlflowException
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from mlops.artifacts import (
    PICKLE_OPT_IN_ENV,
    PIPELINE_FILE,
    UntrustedArtifact,
    file_sha256,
    load_pipeline,
    save_pipeline,
)
from mlops.config import load_config
from mlops.training import train
from tests.conftest import free_port
from tests.helpers import make_csv
from tests.servers import BIN, running, server_env

NAME = "trust-model"


class Payload:
    """Unpickling this runs a command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.fixture
def registered(tmp_path: Path, tracking_uri: str):
    csv = make_csv(tmp_path / "data.csv")
    config = load_config(
        overrides=[
            f"data.dataset={csv}",
            "data.target=label",
            "data.categorical=[color]",
            f"registry.model_name={NAME}",
            f"registry.audit_url=sqlite:///{tmp_path / 'audit.db'}",
            "monitoring.sensitive_columns=[x2, color]",
        ]
    )
    result = train(config, register=True)
    assert result.registered_version == "1"
    return config


def stored_model_dir(name: str, version: str) -> Path:
    """Where the registered version's files live in the (local) artifact store."""
    location = mlflow.MlflowClient().get_model_version_download_uri(name, version)
    path = Path(unquote(urlparse(location).path))
    assert (path / "MLmodel").exists(), location
    return path


def test_pipeline_is_saved_without_pickle_and_checked_before_load(registered) -> None:
    model_dir = stored_model_dir(NAME, "1")
    meta = json.loads((model_dir / "artifacts" / "metadata.json").read_text())
    pipeline_file = model_dir / "artifacts" / PIPELINE_FILE
    assert pipeline_file.exists()
    assert not list(model_dir.rglob("*.joblib")) and not list(model_dir.rglob("*.pkl"))
    assert meta["pipeline_sha256"] == file_sha256(pipeline_file)
    loaded = load_pipeline(pipeline_file, sha256=meta["pipeline_sha256"])
    assert loaded.steps[-1][0] == "model"
    with pytest.raises(UntrustedArtifact, match="does not match the recorded"):
        load_pipeline(pipeline_file, sha256="0" * 64)


def test_sensitive_values_are_not_carried_by_the_model(registered, tmp_path: Path) -> None:
    model_dir = stored_model_dir(NAME, "1")
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    records = example["dataframe_split"]
    columns = records["columns"]
    x2 = [row[columns.index("x2")] for row in records["data"]]
    color = [row[columns.index("color")] for row in records["data"]]
    assert len(set(x2)) == 1  # one aggregate stands in for every row
    assert set(color) == {"***"}
    meta = json.loads((model_dir / "artifacts" / "metadata.json").read_text())
    assert set(meta["sample"]["color"]) <= {"***", None}
    assert len({v for v in meta["sample"]["x2"] if v is not None}) == 1
    raw = json.dumps(meta)
    data = (tmp_path / "data.csv").read_text().splitlines()[1:6]
    for line in data:
        x2_value = line.split(",")[1]
        assert x2_value[:8] not in raw


def test_a_pickle_is_refused_unless_opted_in(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "ran"
    evil = tmp_path / "pipeline.joblib"
    write_payload(evil, marker)
    with pytest.raises(UntrustedArtifact, match=PICKLE_OPT_IN_ENV):
        load_pipeline(evil)
    assert not marker.exists()
    benign = tmp_path / "benign.joblib"
    import joblib

    joblib.dump({"a": 1}, benign)
    monkeypatch.setenv(PICKLE_OPT_IN_ENV, "1")
    assert load_pipeline(benign) == {"a": 1}


def test_a_skops_file_naming_untrusted_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pipeline = Pipeline([("run", FunctionTransformer(os.system, kw_args={}))])
    with pytest.raises(UntrustedArtifact, match="types"):
        save_pipeline(pipeline, tmp_path)  # we never write what we would not read
    path = tmp_path / PIPELINE_FILE
    path.write_bytes(sio.dumps(pipeline))
    with pytest.raises(UntrustedArtifact, match="outside the trusted list"):
        load_pipeline(path)
    (tmp_path / "junk.skops").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UntrustedArtifact, match="not a readable skops file"):
        load_pipeline(tmp_path / "junk.skops")
    assert not marker.exists()


def tamper(tmp_path: Path) -> Path:
    """Replace version 1's pipeline with the payload; return the marker path."""
    marker = tmp_path / "code-ran"
    target = stored_model_dir(NAME, "1") / "artifacts" / PIPELINE_FILE
    write_payload(target, marker)
    return marker


def test_tampered_version_is_refused_by_pyfunc_load(registered, tmp_path: Path) -> None:
    marker = tamper(tmp_path)
    with pytest.raises(MlflowException, match="checksum|not a readable skops file"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    # even a copy whose recorded file hash was forged along with it is not unpickled
    copy = tmp_path / "copy"
    shutil.copytree(stored_model_dir(NAME, "1"), copy)
    (copy / "registered_model_meta").unlink(missing_ok=True)  # a copy that names no version
    meta_path = copy / "artifacts" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["pipeline_sha256"] = file_sha256(copy / "artifacts" / PIPELINE_FILE)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(MlflowException, match="not a readable skops file"):
        mlflow.pyfunc.load_model(str(copy))
    assert not marker.exists()


@pytest.mark.parametrize("server", ["mlops", "mlflow"])
def test_tampered_version_is_not_served(
    registered, tmp_path: Path, tracking_uri: str, server: str
) -> None:
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "production", "1")
    marker = tamper(tmp_path)
    port = free_port()
    if server == "mlops":
        command = [str(BIN / "mlops"), "serve", NAME, "--alias", "production"]
    else:
        command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@production"]
        command += ["--env-manager", "local"]
    command += ["--port", str(port)]
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="server exited|did not answer"):
        with running(command, server_env(tracking_uri), port, log, timeout=60):
            pass
    assert "does not match the recorded" in log.read_text()
    assert not marker.exists()


def test_untampered_version_serves_after_verification(
    registered, tmp_path: Path, tracking_uri: str
) -> None:
    port = free_port()
    command = [str(BIN / "mlops"), "serve", NAME, "--version", "1", "--port", str(port)]
    with running(command, server_env(tracking_uri), port, tmp_path / "server.log") as base:
        from tests.servers import post

        status, body = post(base, {"dataframe_records": [{"x1": 0.1, "x2": 0.2, "color": "red"}]})
    assert status == 200, body
    assert body["predictions"][0]["model_version"] == "1"


def test_a_version_registered_twice_is_still_checked_against_its_own_checksum(
    registered, tmp_path: Path
) -> None:
    """The same logged model registered again outside mlops (no checksum on the copy): loading
    version 1, in a server or a notebook, still checks version 1's recorded checksum, even when
    the pipeline file was swapped together with the hash in metadata.json."""
    client = mlflow.MlflowClient()
    source = client.get_model_version(NAME, "1").source
    again = mlflow.register_model(source, NAME)
    assert str(again.version) == "2" and "mlops.checksum" not in (again.tags or {})
    model_dir = stored_model_dir(NAME, "1")
    weaker = Pipeline([("run", FunctionTransformer())])
    pipeline_file = model_dir / "artifacts" / PIPELINE_FILE
    pipeline_file.write_bytes(sio.dumps(weaker))
    meta_path = model_dir / "artifacts" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["pipeline_sha256"] = file_sha256(pipeline_file)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(MlflowException, match="does not match the recorded"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/1")


def test_download_model_gives_the_registered_files(registered, tmp_path: Path) -> None:
    """The concurrent download holds exactly the files MLflow's own download does."""
    from mlops.artifacts import CHECKSUM_TAG, download_model, model_checksum

    ours = download_model(NAME, "1", tmp_path / "ours")
    theirs = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{NAME}/1", dst_path=str(tmp_path / "theirs")
        )
    )
    recorded = mlflow.MlflowClient().get_model_version(NAME, "1").tags[CHECKSUM_TAG]
    assert model_checksum(ours) == model_checksum(theirs) == recorded
    assert (ours / "code" / "mlops" / "serving" / "wrapper.py").is_file()


def test_download_model_refuses_a_listed_path_outside_its_folder(
    tmp_path: Path, monkeypatch
) -> None:
    """A store (or a server in front of it) that lists ``../x`` cannot make a download write
    outside the destination."""
    import mlflow.store.artifact.artifact_repository_registry as registry
    from mlflow.entities import FileInfo

    from mlops.artifacts import download_model

    written: list[str] = []

    class HostileStore:
        def list_artifacts(self, path):
            return [FileInfo("MLmodel", False, 1), FileInfo("../../escaped", False, 1)]

        def download_artifacts(self, path, dst_path):
            local = Path(dst_path) / path
            written.append(str(local))
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text("x")

    monkeypatch.setattr(registry, "get_artifact_repository", lambda uri: HostileStore())
    with pytest.raises(UntrustedArtifact, match="outside the model folder"):
        download_model("m", "1", tmp_path / "dst")
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert all(Path(p).resolve().is_relative_to((tmp_path / "dst").resolve()) for p in written)


@pytest.mark.parametrize("hostile", ["../../escaped", "/abs/escaped", "link"])
def test_a_servers_archive_cannot_write_outside_the_model_folder(
    tmp_path: Path, hostile: str
) -> None:
    """The team server's one-answer download (``_extract``) refuses a member that leaves the
    folder or is no regular file, before writing it."""
    import io
    import tarfile

    from mlops.artifacts import _extract

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("MLmodel")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
        bad = tarfile.TarInfo(hostile)
        if hostile == "link":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            bad.size = 1
        tar.addfile(bad, io.BytesIO(b"x") if hostile != "link" else None)
    buffer.seek(0)
    with pytest.raises(UntrustedArtifact, match="no file inside the model folder"):
        _extract(buffer, (tmp_path / "dst").resolve(), "m version 1")
    assert (tmp_path / "dst" / "MLmodel").read_bytes() == b"x"
    assert not (tmp_path / "escaped").exists() and not Path("/abs/escaped").exists()
    assert not (tmp_path / "dst" / "link").exists()
