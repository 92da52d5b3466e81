"""MLflow project entry point `tune`: `mlflow run . -e tune --env-manager local -P model=hist_gb -P
n_trials=30`."""

from mlops.cli import entry_point

main = entry_point("tune")

if __name__ == "__main__":
    main()
