"""The serving image's entry point: ``mlops serve`` with settings from the environment.

By default the version inside the image (``MLOPS_MODEL_DIR``, verified against
``MLOPS_MODEL_CHECKSUM`` before it is read) is served, pinned: no registry is needed. With
``MLOPS_FOLLOW_ALIAS`` (and ``MLFLOW_TRACKING_URI``) the server follows that alias through the
registry instead, so a promotion or rollback reaches every replica without a new image.
Secrets (``MLOPS_AUTH_TOKEN``, ``MLOPS_LOG_URL``, ``MLFLOW_TRACKING_PASSWORD``) are read from
the environment by name and never put on a command line. Arguments given to the container
are passed on to ``mlops serve``.
"""

from __future__ import annotations

import os
import sys

from mlops.delivery import contract


def arguments(env: dict[str, str], extra: list[str]) -> list[str]:
    """``mlops serve``'s arguments for the container's environment ``env``."""
    name = env["MLOPS_MODEL_NAME"]
    follow = env.get("MLOPS_FOLLOW_ALIAS", "").strip()
    if follow:
        if not env.get("MLFLOW_TRACKING_URI"):
            raise SystemExit(
                "MLOPS_FOLLOW_ALIAS needs MLFLOW_TRACKING_URI: the registry to follow it in"
            )
        args = ["serve", name, "--alias", follow]
    else:
        args = ["serve", name, "--version", env["MLOPS_MODEL_VERSION"]]
        args += ["--model-dir", env.get("MLOPS_MODEL_DIR", contract.MODEL_DIR)]
        args += ["--checksum", env["MLOPS_MODEL_CHECKSUM"]]
    args += ["--host", "0.0.0.0", "--port", env.get("MLOPS_PORT", str(contract.PORT))]  # noqa: S104 - a container's port
    args += ["--workers", env.get("MLOPS_WORKERS", "").strip() or "1"]
    if env.get("MLOPS_AUTH_TOKEN"):
        args += ["--auth-token-env", "MLOPS_AUTH_TOKEN"]
    monitoring = env.get("MLOPS_MONITORING", "").strip().lower()
    if monitoring in ("1", "true", "yes"):
        args.append("--monitor")
    elif monitoring in ("0", "false", "no"):
        args.append("--no-monitor")
    return args + extra


def main() -> None:
    from mlops.cli import cli

    for key, _, _ in contract.SETTINGS:  # a ConfigMap's empty value means "not set"
        if not os.environ.get(key, "x").strip():
            os.environ.pop(key)
    env = dict(os.environ)
    if env.get("MLOPS_LOG_URL"):
        # the model's setting, overridden without putting the URL (and its password) in argv
        import json

        from mlflow.pyfunc.scoring_server import SERVING_MODEL_CONFIG

        given = json.loads(env.get(SERVING_MODEL_CONFIG) or "{}")
        os.environ[SERVING_MODEL_CONFIG] = json.dumps(
            {**given, "monitoring_url": env["MLOPS_LOG_URL"]}
        )
    cli.main(args=arguments(env, sys.argv[1:]), prog_name="mlops")


if __name__ == "__main__":
    main()
