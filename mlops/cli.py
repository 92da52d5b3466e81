"""The ``mlops`` command line: the lifecycle steps for a terminal user.

Only this module (and ``pipelines/``) prints and configures logging; an ``MlopsError``
becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlops.errors import MlopsError

if TYPE_CHECKING:
    from mlops.config import Config


def _common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False),
            default=None,
            help="Experiment YAML to start from (default: conf/default.yaml).",
        ),
        click.option(
            "--dataset",
            default=None,
            help="A CSV path or sklearn:breast_cancer|wine|iris|diabetes.",
        ),
        click.option("--target", default=None, help="Target column (CSV datasets)."),
        click.option("--seed", type=int, default=None, help="Random seed for split and model."),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override any config key, dotted (repeatable), e.g. --set model.params.C=0.5.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_NAMED_KEYS = {
    "dataset": "data.dataset",
    "target": "data.target",
    "seed": "seed",
    "model": "model.family",
    "n_trials": "tuning.n_trials",
    "timeout": "tuning.timeout",
    "storage": "tuning.storage",
    "study_name": "tuning.study_name",
}


def build_config(config_path: str | None, overrides: Sequence[str], **named: Any) -> Config:
    """The Config from a YAML path, ``--set`` pairs (read as YAML) and the typed named options.

    A named option's value is used as click typed it (``--target yes`` is the string "yes"),
    never re-read as YAML; it wins over a ``--set`` of the same key.
    """
    from mlops.config import load_config

    values = {_NAMED_KEYS[k]: v for k, v in named.items() if v not in (None, "")}
    return load_config(config_path or None, list(overrides), values=values)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show debug logging.")
def cli(verbose: bool) -> None:
    """mlops: from raw data to a monitored MLflow model.

    Runs are tracked wherever MLFLOW_TRACKING_URI points (default: sqlite:///mlflow.db).
    """
    # the registry downloads model files for its gates: no per-file progress bars
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # where boto3 found its credentials is not news
        for chatty in ("botocore", "boto3", "urllib3"):
            logging.getLogger(chatty).setLevel(logging.WARNING)


@cli.command()
@_common_options
def prepare(
    config_path: str | None,
    dataset: str | None,
    target: str | None,
    seed: int | None,
    overrides: tuple[str, ...],
) -> None:
    """Load, validate, clean and split a dataset; log it to an MLflow run.

    \b
    Example:
        mlops prepare --dataset data/churn.csv --target churned
        mlops prepare --dataset sklearn:wine --seed 7
    """
    from mlops import data, lineage
    from mlops.tracking import log_config_file, step_run

    config = build_config(config_path, overrides, dataset=dataset, target=target, seed=seed)
    with step_run(config, run_name="prepare") as run:
        import mlflow

        mlflow.log_params(config.params(model_params=False))
        log_config_file(config)
        split = data.prepare(config)
        lineage.log_split(split, with_files=True, max_mb=config.data.log_data_max_mb)
    click.echo(
        f"prepared {split.source}: {split.n_rows} rows ({split.n_duplicates_dropped} duplicates "
        "dropped), "
        f"train/validation/test = {len(split.train)}/{len(split.validation)}/{len(split.test)}, "
        f"hash {split.content_hash[:12]}, run {run.info.run_id}"
    )
    if split.quality is not None:
        from mlops.rules import summary

        line = summary(split.quality)
        if line:
            click.echo(line)


@cli.command()
@_common_options
@click.option(
    "--model", default=None, help="Model family: logreg, ridge, random_forest, hist_gb, keras_mlp."
)
@click.option(
    "--register/--no-register",
    default=False,
    help="Also register the model under registry.model_name (no alias is set).",
)
@click.option(
    "--output-json",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the run id, model URI, registered version and metrics to this JSON file.",
)
def train(
    config_path: str | None,
    dataset: str | None,
    target: str | None,
    seed: int | None,
    overrides: tuple[str, ...],
    model: str | None,
    register: bool,
    output_json: str | None,
) -> None:
    """Prepare the data and train, evaluate and log one model.

    \b
    Example:
        mlops train --model random_forest --set model.params.n_estimators=300
        mlops train --dataset sklearn:diabetes --model keras_mlp
    """
    import mlflow

    from mlops.training import train as run_training

    config = build_config(
        config_path, overrides, dataset=dataset, target=target, seed=seed, model=model
    )
    result = run_training(config, register=register)
    shown = ", ".join(
        f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()) if k.startswith("test_")
    )
    click.echo(f"trained {result.family} ({result.task}) in run {result.run_id}: {shown}")
    click.echo(
        f"model: {result.model_uri}"
        + (
            f" (registered version {result.registered_version})"
            if result.registered_version
            else ""
        )
    )
    click.echo(f"see it: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}")
    if output_json:
        import json

        summary = {
            "run_id": result.run_id,
            "model_uri": result.model_uri,
            "registered_version": result.registered_version,
            "family": result.family,
            "task": result.task,
            "metrics": result.metrics,
        }
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(output_json).write_text(json.dumps(summary, indent=2) + "\n")


@cli.command()
@click.argument("run_id")
@click.option(
    "--checkout/--no-checkout",
    default=True,
    help="Where the code changed since the run, train at the run's git commit (a temporary "
    "worktree) [default], or with the code here.",
)
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="Largest absolute metric difference accepted [0 for scikit-learn families, 0.01 for "
    "keras_mlp].",
)
def reproduce(run_id: str, checkout: bool, tolerance: float | None) -> None:
    """Re-run training run RUN_ID from its own record (config, data, code) and print each
    metric beside the original; exits 1 when any differs beyond the tolerance.

    \b
    Example:
        mlops reproduce 3f2a9c0d51e84b7a9f0e2d6c1b8a7e55
    """
    from mlops.reproduce import describe
    from mlops.reproduce import reproduce as run_reproduce

    outcome = run_reproduce(run_id, checkout=checkout, tolerance=tolerance)
    for line in describe(outcome):
        click.echo(line)
    if not outcome.matches:
        raise click.ClickException(
            f"run {outcome.run_id} does not reproduce run {run_id}: metrics differ beyond "
            f"{outcome.tolerance:g} (see above)"
        )


@cli.command()
@click.argument("name", required=False)
@click.option(
    "--alias", default=None, help="Registered-model alias to serve and follow [production]."
)
@click.option("--version", "version", default=None, help="Serve this version, not an alias.")
@click.option(
    "--split",
    default=None,
    metavar="ALIAS=WEIGHT,...",
    help="Route requests between aliases (A/B), e.g. production=90,challenger=10.",
)
@click.option(
    "--shadow",
    default=None,
    metavar="ALIAS",
    help="Also score every request with this alias's version, off the request path (logged).",
)
@click.option(
    "--reload-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between registry checks of the aliases (default: serving.reload_interval).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option(
    "--workers",
    "-w",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server worker processes (each follows the registry).",
)
@click.option(
    "--max-rows", type=int, default=None, help="Largest batch accepted (default: as logged)."
)
@click.option(
    "--impute-missing/--reject-missing",
    default=None,
    help="Impute nulls in any column, or accept them only where training data had them.",
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "native", "onnx"]),
    default=None,
    help="Score with the version's ONNX export where one passed parity (auto), the fitted "
    "pipeline (native), or the export only (onnx) (default: as logged, serving.runtime).",
)
@click.option(
    "--onnx-variant",
    type=click.Choice(["float32", "int8", "fp16"]),
    default=None,
    help="Which export auto/onnx serve (default: as logged, serving.onnx_variant).",
)
@click.option(
    "--monitor/--no-monitor",
    "monitor",
    default=None,
    help="Log every prediction for `mlops monitor` (default: as logged, monitoring.enabled).",
)
@click.option(
    "--log-url", default=None, help="SQLAlchemy URL of the prediction log (default: as logged)."
)
@click.option(
    "--auth-token-env",
    default=None,
    metavar="VAR",
    help="Callers must send Authorization: Bearer <the token in $VAR> (401 otherwise); "
    "/ping and /health stay open for probes.",
)
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Serve --version from this folder of its files (a serving image's), without a "
    "registry; needs --checksum.",
)
@click.option(
    "--checksum",
    default=None,
    help="The version's recorded checksum (mlops.checksum tag) the --model-dir files must match.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be served instead of serving it.")
def serve(
    name: str | None,
    alias: str | None,
    version: str | None,
    split: str | None,
    shadow: str | None,
    reload_interval: float | None,
    host: str,
    port: int,
    workers: int,
    max_rows: int | None,
    impute_missing: bool | None,
    runtime: str | None,
    onnx_variant: str | None,
    monitor: bool | None,
    log_url: str | None,
    auth_token_env: str | None,
    model_dir: str | None,
    checksum: str | None,
    dry_run: bool,
) -> None:
    """Serve a registered model over REST, following its alias: MLflow's scoring protocol.

    The same routes, input formats and errors as `mlflow models serve`, every request held
    to the model's input contract (bodies over serving.max_body_bytes get a 413 unread). The
    alias is resolved every serving.reload_interval seconds: a promotion or rollback is
    loaded, verified against its registered checksum and warmed up in the background, then
    swapped in without failing a request (a version that fails is refused, alerted, and the
    old one keeps serving). GET /metrics is for Prometheus. A graceful stop (SIGTERM, Ctrl-C)
    flushes the prediction log after the last answer, and nothing the server started
    outlives this command.

    \b
    Example:
        mlops serve churn-model --alias production --port 5000 --workers 2
        mlops serve churn-model --split production=90,challenger=10 --monitor
        mlops serve churn-model --shadow challenger --monitor
        SERVE_TOKEN=... mlops serve churn-model --auth-token-env SERVE_TOKEN
        curl -s localhost:5000/invocations -H 'Content-Type: application/json' \\
             -d '{"dataframe_records": [{"x1": 0.3, "x2": 1.2}]}'
    """
    from mlops.config import load_config
    from mlops.registry import canonical_version, record_traffic
    from mlops.serving.routing import parse_split
    from mlops.serving.server import ServeSpec, supervise

    config = load_config()
    if version is not None and (alias or split or shadow):
        raise click.UsageError("--version serves one version: leave out --alias, --split, --shadow")
    if alias and split:
        raise click.UsageError("--split names the aliases to serve: leave out --alias")
    if model_dir is not None and (version is None or not checksum):
        raise click.UsageError(
            "--model-dir serves one version's files: give its --version and its --checksum "
            "(the mlops.checksum tag of that registered version)"
        )
    if checksum is not None and model_dir is None:
        raise click.UsageError("--checksum checks the files of --model-dir: give that folder")
    arms = parse_split(split) if split else ((alias or "production", 1.0),)
    if shadow and shadow in {a for a, _ in arms}:
        raise click.UsageError(f"--shadow {shadow} also answers requests: shadow another alias")
    if shadow and monitor is False:
        raise click.UsageError("--shadow logs its predictions: leave out --no-monitor")
    if auth_token_env is not None and not os.environ.get(auth_token_env):
        raise click.UsageError(
            f"--auth-token-env {auth_token_env}: that variable is not set or empty; put the "
            "token callers must send in it (the option names the variable, not the token)"
        )
    options = {
        k: v
        for k, v in {
            "max_rows": max_rows,
            "impute_missing": impute_missing,
            "runtime": runtime,
            "onnx_variant": onnx_variant,
            "monitoring": monitor,
            "monitoring_url": log_url,
        }.items()
        if v is not None
    }
    spec = ServeSpec(
        name=name or config.registry.model_name,
        arms=arms,
        version=canonical_version(version) if version is not None else None,
        shadow=shadow,
        reload_interval=reload_interval or config.serving.reload_interval,
        shadow_queue=config.serving.shadow_queue,
        model_config=options,
        auth_token_env=auth_token_env,
        model_dir=os.path.abspath(model_dir) if model_dir else None,
        checksum=checksum,
    )
    shown = {k: ("***" if k == "monitoring_url" else v) for k, v in options.items()}
    click.echo(
        f"serving {spec.describe()} on http://{host}:{port} with {workers} worker(s)"
        + (f" (model config {shown})" if options else ""),
        err=True,
    )
    if dry_run:
        return
    # a split or a shadow is an audit row when it starts and when it stops
    traffic: list[tuple[Any, Any, str]] = []
    if len(spec.arms) > 1:
        traffic.append(("split_start", "split_stop", ",".join(f"{a}={w:g}" for a, w in arms)))
    if spec.shadow:
        traffic.append(("shadow_start", "shadow_stop", f"shadow {spec.shadow}"))
    for start, _, detail in traffic:  # audit first: what cannot be recorded is not served
        record_traffic(config, spec.name, start, detail)
    code: int | None = None
    try:
        code = supervise(spec, host=host, port=port, workers=workers)
    finally:
        for _, stop, detail in traffic:
            try:
                record_traffic(
                    config,
                    spec.name,
                    stop,
                    detail,
                    reason=f"mlops serve stopped (exit status {code})",
                )
            except MlopsError as exc:
                click.echo(f"mlops serve: {stop} not recorded in the audit trail: {exc}", err=True)
    if code:
        raise SystemExit(code)


@cli.command()
@click.argument("name", required=False)
@click.option("--alias", default=None, help="Deploy the version this alias names [production].")
@click.option("--version", "version", default=None, help="Deploy this version, not an alias.")
@click.option(
    "--image", required=True, help="The image `mlops package` built for it (REPO:TAG or @digest)."
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for the manifests (kustomize-ready).",
)
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--max-replicas",
    type=click.IntRange(min=1),
    default=None,
    help="Autoscaler ceiling [max(5, replicas)].",
)
@click.option(
    "--target-cpu",
    type=click.IntRange(1, 100),
    default=70,
    show_default=True,
    help="Autoscaler target: average CPU, percent of the request.",
)
@click.option("--cpu-request", default="250m", show_default=True)
@click.option("--cpu-limit", default="1", show_default=True)
@click.option("--memory-request", default="512Mi", show_default=True)
@click.option("--memory-limit", default="1Gi", show_default=True)
@click.option(
    "--tracking-uri",
    default="",
    help="MLFLOW_TRACKING_URI of the pods, without credentials (they go in the Secret).",
)
@click.option("--app-name", default=None, help="Kubernetes name [from the model name].")
@click.option("--force", is_flag=True, help="Overwrite manifests that differ in --out.")
def k8s(
    name: str | None,
    alias: str | None,
    version: str | None,
    image: str,
    out: str,
    replicas: int,
    max_replicas: int | None,
    target_cpu: int,
    cpu_request: str,
    cpu_limit: str,
    memory_request: str,
    memory_limit: str,
    tracking_uri: str,
    app_name: str | None,
    force: bool,
) -> None:
    """Write Kubernetes manifests for a registered version's image, validated strictly.

    A Deployment (probes, resources, non-root, settings from a ConfigMap and a Secret it
    never contains), a Service, an autoscaler and a disruption budget, with a
    kustomization.yaml. Port, probe path, user and labels match the image `mlops package`
    built from the same version.

    \b
    Example:
        mlops k8s churn-model --alias production --image ghcr.io/acme/churn:v4 --out k8s/
        kubectl create secret generic churn-model-secrets --from-env-file=secrets.env
        kubectl apply -k k8s/
    """
    from pathlib import Path

    from mlops.config import load_config
    from mlops.delivery.contract import version_facts
    from mlops.delivery.k8s import (
        ManifestOptions,
        ValidatorMissing,
        validate_manifests,
        write_manifests,
    )
    from mlops.errors import RegistryError
    from mlops.registry import canonical_version, check_name

    if version is not None and alias is not None:
        raise click.UsageError("--version names the version: leave out --alias")
    name = check_name(name or load_config().registry.model_name)
    try:
        if version is not None:
            facts = version_facts(name, version=canonical_version(version))
        else:
            facts = version_facts(name, alias=alias or "production")
    except RegistryError as exc:
        if "not found" not in str(exc).lower():
            raise
        raise RegistryError(
            f"{exc} (`mlops status {name}` lists its versions and aliases; "
            "pass one with --alias or --version)"
        ) from None
    options = ManifestOptions(
        app_name=app_name,
        replicas=replicas,
        max_replicas=max_replicas,
        target_cpu=target_cpu,
        cpu_request=cpu_request,
        cpu_limit=cpu_limit,
        memory_request=memory_request,
        memory_limit=memory_limit,
        tracking_uri=tracking_uri,
    )
    paths = write_manifests(facts, image, Path(out), options, force=force)
    click.echo(f"{facts.name} version {facts.version} as {image}: wrote to {out}")
    for path in paths:
        click.echo(f"  {path}")
    try:
        versions = validate_manifests(paths)
    except ValidatorMissing as exc:
        click.echo(f"warning: {exc}", err=True)
    else:
        click.echo(f"valid (strict) for Kubernetes {', '.join(versions)}")


@cli.command()
@click.argument("name", required=False)
@click.option("--alias", default=None, help="Package the version this alias names [production].")
@click.option("--version", "version", default=None, help="Package this version, not an alias.")
@click.option("--image", required=True, help="Tag of the image to build, e.g. churn:v4.")
@click.option(
    "--base-image",
    default=None,
    help="Base with Python and pip on its PATH (default: mlops/python:3.11-bookworm, built "
    "by `make base-image` from Debian's mirror).",
)
@click.option(
    "--context-out",
    type=click.Path(file_okay=False),
    default=None,
    help="Also keep the build context (Dockerfile, files) in this folder.",
)
@click.option("--quiet", is_flag=True, help="Print only the result, not Docker's build output.")
def package(
    name: str | None,
    alias: str | None,
    version: str | None,
    image: str,
    base_image: str | None,
    context_out: str | None,
    quiet: bool,
) -> None:
    """Build a serving image of one registered version through MLflow's Docker support.

    The version's files are verified against the checksum recorded at registration before
    anything reads them. The image runs `mlops serve` as a non-root user on port 8080, answers
    /ping for probes, takes its settings from the environment (MLFLOW_TRACKING_URI,
    MLOPS_FOLLOW_ALIAS, MLOPS_WORKERS, MLOPS_MONITORING; secrets MLOPS_AUTH_TOKEN,
    MLOPS_LOG_URL, MLFLOW_TRACKING_USERNAME/PASSWORD), and carries the version, its checksum
    and the git commit as labels.

    \b
    Example:
        make base-image        # once per Docker host, where no image registry is reachable
        mlops package churn-model --alias production --image churn:prod
        docker run --rm -p 8080:8080 -e MLOPS_AUTH_TOKEN=... churn:prod
    """
    from mlops.config import load_config
    from mlops.delivery.contract import version_facts
    from mlops.delivery.image import DEFAULT_BASE_IMAGE
    from mlops.delivery.image import package as build
    from mlops.registry import canonical_version

    if alias and version:
        raise click.UsageError("give --alias or --version, not both")
    config = load_config()
    facts = version_facts(
        name or config.registry.model_name,
        alias=None if version else (alias or "production"),
        version=canonical_version(version) if version else None,
    )
    click.echo(f"packaging {facts.name} version {facts.version} as {image}", err=True)
    built = build(
        facts,
        image,
        base_image=base_image or DEFAULT_BASE_IMAGE,
        context_out=Path(context_out) if context_out else None,
        quiet=quiet,
    )
    click.echo(
        f"built {built.image} ({built.image_id[:19]}) in {built.seconds:.0f} s: "
        f"{facts.name} version {facts.version}, checksum {facts.checksum[:12]}..., "
        f"commit {facts.commit or 'unknown'}"
    )


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML with a server: section (default: conf/default.yaml).",
)
@click.option(
    "--backend-store-uri", default=None, help="PostgreSQL URL (default: server.backend_store_uri)."
)
@click.option(
    "--artifacts-destination",
    default=None,
    help="s3://bucket/prefix for proxied artifacts (default: server.artifacts_destination).",
)
@click.option("--host", default=None, help="Interface (default: server.host).")
@click.option("--port", type=int, default=None, help="Port (default: server.port).")
@click.option(
    "--workers", type=int, default=None, help="Worker processes (default: server.workers)."
)
@click.option("--check", "check_only", is_flag=True, help="Run the checks, start nothing.")
def server(
    config_path: str | None,
    backend_store_uri: str | None,
    artifacts_destination: str | None,
    host: str | None,
    port: int | None,
    workers: int | None,
    check_only: bool,
) -> None:
    """Run the team's MLflow server: PostgreSQL, S3 artifacts, logins, enforced promotions.

    `mlflow server` with the backend store on PostgreSQL, artifacts proxied to S3 (through
    boto3; MLFLOW_S3_ENDPOINT_URL names any S3-compatible endpoint) and the mlops auth app:
    MLflow's basic-auth, plus a policy on the server (moving production needs MANAGE on the
    model, staging needs EDIT) and an audit row in the server's database for every alias or
    stage move, by whichever client. It refuses to start without the admin password in
    $MLOPS_ADMIN_PASSWORD (server.admin_password_env), or when the database or the bucket
    cannot be reached, and says which.

    \b
    Example (conf/default.yaml's server: section holds the same settings):
        export MLOPS_ADMIN_PASSWORD='a long random secret'
        export MLFLOW_S3_ENDPOINT_URL=https://s3.internal:9000   # omit for AWS S3
        mlops server --backend-store-uri 'postgresql+psycopg://mlflow:${PGPASS}@db:5432/mlflow' \\
                     --artifacts-destination s3://ml-artifacts/mlflow --host 0.0.0.0
        # then, for each user:
        MLFLOW_TRACKING_URI=http://server:5000 MLFLOW_TRACKING_USERNAME=alice \\
        MLFLOW_TRACKING_PASSWORD=... mlops promote churn-model --version 4 --to production
    """
    from mlops.config import load_config
    from mlops.team import launch

    named = {
        "server.backend_store_uri": backend_store_uri,
        "server.artifacts_destination": artifacts_destination,
        "server.host": host,
        "server.port": port,
        "server.workers": workers,
    }
    values = {k: v for k, v in named.items() if v is not None}
    settings = load_config(config_path or None, values=values).server  # errors name the key
    if check_only:
        launch.check(settings)
        click.echo("mlops server: admin password set, database and bucket reachable", err=True)
        return
    code = launch.run(settings)
    if code:
        raise SystemExit(code)


@cli.command()
@_common_options
@click.option("--model", default=None, help="Model family whose search space to search.")
@click.option("--n-trials", type=int, default=None, help="Trials in the study, across all workers.")
@click.option(
    "--timeout", type=float, default=None, help="Stop starting trials after this many seconds."
)
@click.option(
    "--storage", default=None, help="Optuna storage URL: sqlite:///optuna.db, postgresql://..."
)
@click.option("--study-name", default=None, help="Study to create, resume or join.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def tune(
    config_path: str | None,
    dataset: str | None,
    target: str | None,
    seed: int | None,
    overrides: tuple[str, ...],
    model: str | None,
    n_trials: int | None,
    timeout: float | None,
    storage: str | None,
    study_name: str | None,
    no_progress: bool,
) -> None:
    """Search hyperparameters with Optuna; retrain, log and register the best.

    Each trial is a nested MLflow run. Start the same command on several machines with one
    PostgreSQL --storage and --study-name to share the study.

    \b
    Example:
        mlops tune --model hist_gb --n-trials 30
        mlops tune --model hist_gb --n-trials 60 \\
            --storage postgresql://optuna@db/optuna --study-name churn-hgb
    """
    import optuna

    from mlops.tuning import tune as run_tuning

    if not no_progress:  # the progress bar says it; per-trial log lines would break it up
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = build_config(
        config_path,
        overrides,
        dataset=dataset,
        target=target,
        seed=seed,
        model=model,
        n_trials=n_trials,
        timeout=timeout,
        storage=storage,
        study_name=study_name,
    )
    result = run_tuning(config, progress=not no_progress)
    click.echo(
        f"study {result.study_name}: {result.n_complete} complete, {result.n_pruned} pruned, "
        f"{result.n_failed} failed; parent run {result.parent_run_id}"
    )
    if result.best_trial is not None:
        click.echo(
            f"best trial {result.best_trial}: validation_{result.metric}={result.best_value:.4f} "
            f"{result.best_params}"
        )
    if result.model_uri:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.test_metrics.items()))
        click.echo(
            f"best retrained on the training split: {shown}; model {result.model_uri}"
            + (
                f", registered as {config.registry.model_name} version {result.registered_version}"
                if result.registered_version
                else ""
            )
        )


def _registry_config(config_path: str | None):
    from mlops.config import load_config

    return load_config(config_path or None)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Experiment YAML with the registry settings (default: conf/default.yaml).",
)


def _print_gates(gates) -> None:
    for gate in gates:
        click.echo("  " + gate.line(), err=not gate.passed)


def _append_report(path: str, title: str, gates) -> None:
    """Append the gate verdicts to ``path`` as Markdown (a CI job summary, e.g.
    $GITHUB_STEP_SUMMARY)."""

    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [
        f"### {title}",
        "",
        "| gate | verdict | measured | required |",
        "| --- | --- | --- | --- |",
    ]
    for gate in gates:
        verdict = "pass" if gate.passed else "**FAIL**"
        detail = f" ({gate.detail})" if gate.detail else ""
        lines.append(
            f"| {cell(gate.gate)} | {verdict} | {cell(gate.measured)}{cell(detail)} "
            f"| {cell(gate.required)} |"
        )
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n\n")


@cli.command()
@click.argument("name", required=False)
@click.option("--version", "version", required=True, help="The version to check.")
@click.option(
    "--to",
    "to",
    type=click.Choice(["staging", "production"]),
    default="production",
    show_default=True,
)
@_config_option
def evaluate(name: str | None, version: str, to: str, config_path: str | None) -> None:
    """Run the gates a promotion would face now, changing nothing (exit 1 if any fails).

    \b
    Example:
        mlops evaluate churn-model --version 4 --to production
    """
    from mlops.errors import GateFailed
    from mlops.registry import canonical_version, check_name
    from mlops.registry import evaluate as run_gates

    config = _registry_config(config_path)
    name = check_name(name or config.registry.model_name)
    version = canonical_version(version)
    from mlops.tracking import name_project_run

    name_project_run(f"evaluate-{name}-v{version}")
    gates = run_gates(config, name, version, to)
    click.echo(f"gates for {name} version {version} -> {to}:")
    _print_gates(gates)
    failed = [g for g in gates if not g.passed]
    if failed:
        raise GateFailed(
            f"{len(failed)} gate(s) would refuse {name} version {version} for {to}", failed
        )


@cli.command()
@click.argument("name", required=False)
@click.option("--version", "version", required=True, help="The version to promote.")
@click.option("--to", "to", type=click.Choice(["staging", "production"]), required=True)
@click.option(
    "--reason", default=None, help="Why (recorded in the audit trail; required with --force)."
)
@click.option(
    "--force", is_flag=True, help="Promote to production without passing through staging."
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also append the gate verdicts as Markdown to this file (a CI job summary, e.g. "
    "$GITHUB_STEP_SUMMARY), promoted or refused.",
)
@_config_option
def promote(
    name: str | None,
    version: str,
    to: str,
    reason: str | None,
    force: bool,
    config_path: str | None,
    report: str | None,
) -> None:
    """Promote a model version to staging or production, past the validation gates.

    \b
    Example:
        mlops promote churn-model --version 4 --to staging --reason "weekly retrain"
        mlops promote churn-model --version 4 --to production
    """
    from mlops.errors import GateFailed
    from mlops.registry import canonical_version, check_name
    from mlops.registry import promote as run_promotion

    config = _registry_config(config_path)
    name = check_name(name or config.registry.model_name)
    version = canonical_version(version)
    from mlops.tracking import name_project_run

    name_project_run(f"promote-{name}-v{version}")
    try:
        result = run_promotion(config, name, version, to, reason=reason, force=force)
    except GateFailed as exc:
        click.echo(f"refused: {name} version {version} -> {to}", err=True)
        _print_gates(exc.gates)
        if report:
            _append_report(report, f"{name} version {version} -> {to}: refused", exc.gates)
        raise
    _print_gates(result.gates)
    if report:
        _append_report(report, f"{name} version {version} -> {to}: promoted", result.gates)
    click.echo(
        f"{name}: {to} is now version {result.to_version} (was {result.from_version or 'none'}); "
        f"audit #{result.audit_id} by {result.who}"
    )


@cli.command()
@click.argument("name", required=False)
@click.option(
    "--to",
    "to_version",
    default=None,
    help="Version to go back to (default: the one production replaced).",
)
@click.option(
    "--reason", default=None, help="Why (recorded in the audit trail; required with --force)."
)
@click.option(
    "--force",
    is_flag=True,
    help="With --to: skip the staging gates (the checksum and schema gates still run).",
)
@_config_option
def rollback(
    name: str | None,
    to_version: str | None,
    reason: str | None,
    force: bool,
    config_path: str | None,
) -> None:
    """Move production back to the version it replaced, in one command.

    Going back to the version production replaced (per the audit trail) passes the checksum and
    schema gates; any other --to version faces the staging gates and a smoke prediction too,
    unless --force with a --reason.

    \b
    Example:
        mlops rollback churn-model --reason "accuracy alert"
        mlops rollback churn-model --to 2
    """
    from mlops.errors import GateFailed
    from mlops.registry import canonical_version, check_name
    from mlops.registry import rollback as run_rollback

    config = _registry_config(config_path)
    name = check_name(name or config.registry.model_name)
    if to_version:
        to_version = canonical_version(to_version, "--to")
    try:
        result = run_rollback(config, name, to_version=to_version, reason=reason, force=force)
    except GateFailed as exc:
        click.echo(f"rollback of {name} refused", err=True)
        _print_gates(exc.gates)
        raise
    _print_gates(result.gates)
    click.echo(
        f"{name}: production rolled back to version {result.to_version} (from "
        f"{result.from_version}); "
        f"audit #{result.audit_id} by {result.who}"
    )


@cli.command()
@click.argument("name", required=False)
@_config_option
def status(name: str | None, config_path: str | None) -> None:
    """Print the versions of a registered model with aliases, metrics, data hash and age.

    \b
    Example:
        mlops status churn-model
    """
    from mlops.registry import check_name, reconcile
    from mlops.registry import status as read_status

    config = _registry_config(config_path)
    name = check_name(name or config.registry.model_name)
    reconcile(name, config)  # changes made outside mlops: warned about and recorded
    rows = read_status(name)
    click.echo(f"{name}: {len(rows)} version(s)")
    click.echo(
        f"{'version':>7}  {'family':<14} {'task':<14} {'aliases':<20} {'stage':<10} "
        f"{'created (UTC)':<19}  "
        f"{'data hash':<12}  metrics"
    )
    for r in rows:
        shown = ", ".join(f"{k}={val:.4f}" for k, val in r.metrics.items() if k.startswith("test_"))
        click.echo(
            f"{r.version:>7}  {r.family:<14} {r.task:<14} {','.join(r.aliases) or '-':<20} "
            f"{r.stage:<10} "
            f"{r.created:%Y-%m-%d %H:%M:%S}  {(r.data_hash or '-')[:12]:<12}  {shown}"
        )


@cli.command()
@click.argument("name", required=False)
@_config_option
def audit(name: str | None, config_path: str | None) -> None:
    """Print the audit trail of promotions, refusals and rollbacks of a model.

    \b
    Example:
        mlops audit churn-model
    """
    from mlops.errors import RegistryError
    from mlops.registry import audit_trail, check_name, reconcile

    config = _registry_config(config_path)
    name = check_name(name or config.registry.model_name)
    try:
        reconcile(name, config)  # changes made outside mlops: warned about and recorded
    except RegistryError as exc:  # e.g. the model was deleted: its trail is still shown
        click.echo(f"warning: not compared with the registry: {exc}", err=True)
    for r in audit_trail(config, name):
        click.echo(r.line())


_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, dotted (repeatable), e.g. --set monitoring.min_rows=50.",
)


@cli.command()
@click.argument("name", required=False)
@click.option(
    "--window",
    default=None,
    help="Span of predictions to check: 90s, 30m, 1h, 2d (default: monitoring.window).",
)
@click.option("--every", default=None, help="Check again at this interval (5m, 1h) until stopped.")
@click.option("--count", type=int, default=None, help="With --every: stop after this many checks.")
@click.option(
    "--compare",
    "compare",
    default=None,
    metavar="ALIAS",
    help="Also compare production with this alias's version on the same window (split or "
    "shadow traffic): per-arm table and the test of their difference.",
)
@_config_option
@_set_option
def monitor(
    name: str | None,
    window: str | None,
    every: str | None,
    count: int | None,
    compare: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Check the production version: drift, latency, errors, accuracy; alert; roll back.

    Each check is one MLflow run in the experiment NAME-monitoring (metrics stepped by the
    check time, so the UI charts them over time), with a drift report as its artifact. While a
    server splits or shadows traffic to a second alias, the run also compares the two arms
    (compare/ metrics); --compare ALIAS names the alias and prints the comparison.

    \b
    Example:
        mlops monitor churn-model --window 1h
        mlops monitor churn-model --window 1h --every 5m
        mlops monitor churn-model --window 24h --compare challenger
    """
    import time

    from mlops.monitoring.checks import check, parse_duration
    from mlops.monitoring.compare import table

    config = build_config(config_path, overrides)
    name = name or config.registry.model_name
    from mlops.tracking import name_project_run

    name_project_run(f"monitor-{name}")
    interval = parse_duration(every, "--every") if every else None
    done = 0
    while True:
        started = time.monotonic()
        result = check(config, name, window=window, compare=compare)
        _print_check(result)
        lines = table(result.metrics, config.monitoring.compare_min_labels)
        if lines:
            click.echo("  compare:")
            for line in lines:
                click.echo("  " + line)
        done += 1
        if interval is None or (count is not None and done >= count):
            return
        try:
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            return


def _print_check(result) -> None:
    m = result.metrics
    click.echo(
        f"{result.model} v{result.version}: {int(m.get('requests', 0))} requests, "
        f"{int(m.get('predictions', 0))} predictions, {int(m.get('labelled', 0))} labelled in the "
        "last "
        f"{result.window_s:g} s; run {result.run_id}"
    )
    shown = [
        k
        for k in (
            "client_error_rate",
            "server_error_rate",
            "latency_p50_ms",
            "latency_p99_ms",
            "dropped_rows",
            "psi_max",
            "prediction_psi",
            "accuracy",
            "f1",
            "accuracy_drop",
            "rmse",
            "rmse_ratio",
        )
        if k in m
    ]
    if shown:
        click.echo("  " + ", ".join(f"{k}={m[k]:.4g}" for k in shown))
    if result.drifted:
        click.echo(f"  drifted features: {', '.join(result.drifted)}")
    for note in result.notes:
        click.echo(f"  note: {note}")
    for alert in result.alerts:
        extra = "".join(
            f"; {x}" for x in (alert.action, alert.webhook and f"webhook {alert.webhook}") if x
        )
        click.echo(f"  ALERT {alert.message}{extra}")


@cli.command()
@click.argument("name", required=False)
@click.option(
    "--labels",
    "labels_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="CSV with columns request_id,label (and row, for multi-row requests).",
)
@_config_option
@_set_option
def feedback(
    name: str | None, labels_path: str, config_path: str | None, overrides: tuple[str, ...]
) -> None:
    """Attach ground-truth labels to logged predictions, joined on the request id.

    The server returns a request_id column with every prediction when monitoring is on.

    \b
    Example:
        mlops feedback churn-model --labels labels.csv      # request_id,label
    """
    from mlops.monitoring import feedback as run_feedback

    config = build_config(config_path, overrides)
    name = name or config.registry.model_name
    stored = run_feedback(config, name, labels_path)
    click.echo(f"{name}: {stored} labels attached")


@cli.command()
@click.argument("name", required=False)
@click.option("--alias", default=None, help="Alias of the version to score with [production].")
@click.option("--version", "version", default=None, help="Score with this version, not an alias.")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="CSV or Parquet: a file, a folder or a glob (quoted); local or s3://bucket/key.",
)
@click.option(
    "--output",
    "output_uri",
    required=True,
    help="Where scores go: a .parquet or .csv file (pandas), a Parquet folder (spark); or s3://.",
)
@click.option(
    "--rejects",
    "rejects_uri",
    default=None,
    help="CSV of the rows the model's input contract refuses, with a reason column "
    "(default: <output>-rejects.csv).",
)
@click.option(
    "--engine",
    type=click.Choice(["pandas", "spark"]),
    default=None,
    help="pandas: one process, streamed in chunks; spark: the same model in Spark's Python "
    "workers on Arrow batches (default: scoring.engine).",
)
@click.option(
    "--spark-master",
    default=None,
    help="Spark master URL for --engine spark (default: scoring.spark_master, local[2]).",
)
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    default=None,
    help="The most rows held at once, scored in quarters (default: scoring.chunk_rows).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output and rejects file.")
@_config_option
@_set_option
def score(
    name: str | None,
    alias: str | None,
    version: str | None,
    input_uri: str,
    output_uri: str,
    rejects_uri: str | None,
    engine: str | None,
    spark_master: str | None,
    chunk_rows: int | None,
    overwrite: bool,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Score a table with a registered version; refused rows go to a rejects file.

    The version's files are verified against their registered checksum before it is loaded.
    Each output row gets the answer (prediction, probabilities, model_version) and the
    scoring_run_id of the MLflow run that records the job.

    \b
    Example:
        mlops score churn-model --alias production --input data/december.parquet \\
              --output scores.parquet
        mlops score churn-model --version 4 --input 's3://lake/2026/*.csv' \\
              --output scores/ --engine spark --spark-master spark://head:7077
    """
    from mlops.registry import check_name
    from mlops.scoring import score as run_score

    if version is not None and alias is not None:
        raise click.UsageError("--version and --alias both name a version: pass one of them")
    config = build_config(config_path, overrides)
    name = check_name(name or config.registry.model_name)
    result = run_score(
        config,
        name,
        input_uri=input_uri,
        output_uri=output_uri,
        alias=alias,
        version=version,
        engine=engine,
        rejects_uri=rejects_uri,
        spark_master=spark_master,
        chunk_rows=chunk_rows,
        overwrite=overwrite,
    )
    click.echo(
        f"{name} version {result.version} ({result.engine}): {result.rows_scored} rows scored "
        f"into {result.output}, {result.rows_rejected} rejected"
        + (f" into {result.rejects}" if result.rows_rejected else "")
        + f", {result.seconds:.1f} s ({result.rows_per_second:,.0f} rows/s); "
        f"run {result.run_id}"
    )


@cli.command()
@click.argument("name", required=False)
@click.option("--alias", default=None, help="Alias of the version to explain [production].")
@click.option("--version", "version", default=None, help="Explain this version, not an alias.")
@click.option(
    "--input",
    "input_path",
    default=None,
    help="CSV (with a header row) or Parquet file of the rows to explain.",
)
@click.option(
    "--request-id",
    default=None,
    help="Explain the rows of this served request, from the prediction log (monitoring on); "
    "by default with the version that answered it.",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Contributions printed per row, largest first.",
)
@_config_option
@_set_option
def explain(
    name: str | None,
    alias: str | None,
    version: str | None,
    input_path: str | None,
    request_id: str | None,
    top: int,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Explain a registered version's answers: each row's largest feature contributions.

    Contributions are SHAP values per original feature (see the README's Explanations); with
    the expected value they add up to the model output named on each row. The version's
    files are verified against their registered checksum before it is loaded; every
    contribution is logged as the table explain/contributions.json of a new run.

    \b
    Example:
        mlops explain churn-model --alias production --input rows.csv --top 3
        mlops explain churn-model --request-id 3f2a... --top 5
    """
    from mlops.registry import check_name
    from mlops.scoring.explain import explain_version

    if version is not None and alias is not None:
        raise click.UsageError("--version and --alias both name a version: pass one of them")
    if (input_path is None) == (request_id is None):
        raise click.UsageError("give the rows to explain: --input FILE or --request-id ID")
    config = build_config(config_path, overrides)
    name = check_name(name or config.registry.model_name)
    result = explain_version(
        config, name, alias=alias, version=version, input_path=input_path, request_id=request_id
    )
    for i, record in enumerate(result.contributions.as_records(top)):
        click.echo(
            f"row {i}: {record['explains']} = {record['value']:.6g} "
            f"(expected {record['expected_value']:.6g})"
        )
        for item in record["contributions"]:
            click.echo(f"  {item['contribution']:+.6g}  {item['feature']}")
        if record["others"]:
            click.echo(f"  {record['others']:+.6g}  (the other features)")
    click.echo(f"{name} version {result.version}: run {result.run_id}")


@cli.command()
@click.argument("name", required=False)
@click.option("--version", "version", required=True, help="The registered version to export.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx"]),
    default="onnx",
    show_default=True,
    help="The export format.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8", "fp16"]),
    default=None,
    help="Export a quantized variant (int8: dynamic quantization of weights; fp16: float16 "
    "weights, float32 inputs/outputs) instead of float32.",
)
@click.option(
    "--register",
    is_flag=True,
    help="Also register the exported model as a new version (tagged mlops.onnx_export_of), "
    "so it can pass the gates like any version.",
)
@_config_option
@_set_option
def export(
    name: str | None,
    version: str,
    fmt: str,
    quantize: str | None,
    register: bool,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Export a registered version as one ONNX graph (preprocessing and model).

    The version's files are verified against their registered checksum before it is loaded.
    The export is compared with the native model on the run's test split (export.tolerance,
    export.max_metric_drop); only when it passes are onnx/<variant>/<sha>/model.onnx and report.json
    logged to the version's run and the version tagged mlops.onnx.<variant>.sha256.

    \b
    Example:
        mlops export churn-model --version 3 --format onnx
        mlops export churn-model --version 3 --format onnx --quantize int8 --register
    """
    from mlops.export import export as run_export
    from mlops.registry import check_name

    config = build_config(config_path, overrides)
    name = check_name(name or config.registry.model_name)
    result = run_export(name, version, config, quantize=quantize, register=register)
    report = result.report
    metric = report["metric"]
    click.echo(
        f"{name} version {result.version}: ONNX {result.variant} (opset {report['opset']}) "
        f"parity passed on {report['rows_compared']} test rows: max abs difference "
        f"{report['max_abs_difference']:.3g}, {report['label_mismatches']} label mismatches, "
        f"{metric['name']} {metric['native']:.4f} native vs {metric['onnx']:.4f} onnx "
        f"(drop {metric['drop']:.4g})"
    )
    click.echo(
        f"  {result.artifact_path} on run {result.run_id}: {report['size_bytes']:,} bytes, "
        f"{report['size_ratio']:.3g}x the native pipeline ({report['native_size_bytes']:,} bytes)"
    )
    if result.registered_version:
        click.echo(f"  registered as {name} version {result.registered_version}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: runs the CLI, mapping MlopsError to one line and exit 1."""
    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name="mlops", standalone_mode=False
        )
    except MlopsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def entry_point(command: str) -> Callable[[], None]:
    """A ``main()`` for one MLflow-project entry point: ``python -m pipelines.<command>``."""
    return functools.partial(_run_entry, command)


def _run_entry(command: str) -> None:
    args = entry_args(command, sys.argv[1:])
    main([command, *args])


def entry_args(command: str, argv: Sequence[str]) -> list[str]:
    """The ``mlops COMMAND`` arguments for what an MLproject entry point passed.

    MLproject passes every parameter as ``--name value``: an empty value means "not set, use
    the config"; ``--overrides`` holds ``key=value`` pairs split as a shell would split them
    (quote a value with spaces: ``'model.params.hidden_units=[64, 32]'``); the command's flags
    (``--no-progress``) take no value.
    """
    import shlex

    flags = {
        opt
        for p in cli.commands[command].params
        if isinstance(p, click.Option) and p.is_flag
        for opt in p.opts
    }
    args, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in flags or not arg.startswith("--"):
            if arg:
                args.append(arg)
            continue
        value = rest.pop(0) if rest else ""
        if value == "":
            continue
        if arg == "--overrides":
            try:
                pairs = shlex.split(value)
            except ValueError as exc:
                raise SystemExit(
                    f"error: overrides: {exc} in {value!r}; quote each key=value as a shell would"
                ) from None
            args += [f"--set={pair}" for pair in pairs]
        else:
            args += [arg, value]
    return args
