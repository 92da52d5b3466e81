"""MLflow project entry point `train`: `mlflow run . -e train --env-manager local`."""

from mlops.cli import entry_point

main = entry_point("train")

if __name__ == "__main__":
    main()
