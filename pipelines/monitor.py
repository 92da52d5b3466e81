"""MLflow project entry point `monitor`: `mlflow run . -e monitor --env-manager local -P
name=NAME`."""

from mlops.cli import entry_point

main = entry_point("monitor")

if __name__ == "__main__":
    main()
