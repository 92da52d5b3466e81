"""MLflow project entry point `prepare`: `mlflow run . -e prepare --env-manager local`."""

from mlops.cli import entry_point

main = entry_point("prepare")

if __name__ == "__main__":
    main()
