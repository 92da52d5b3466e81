"""MLflow project entry point `evaluate`: `mlflow run . -e evaluate --env-manager local -P
version=N`."""

from mlops.cli import entry_point

main = entry_point("evaluate")

if __name__ == "__main__":
    main()
