"""MLflow project entry point `promote`: `mlflow run . -e promote --env-manager local -P
version=N`."""

from mlops.cli import entry_point

main = entry_point("promote")

if __name__ == "__main__":
    main()
