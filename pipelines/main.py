"""MLflow project entry point `main` (the default): prepare the data and train a model.

mlflow run . --env-manager local
mlflow run . --env-manager local -P dataset=sklearn:wine -P model=random_forest
"""

from mlops.cli import entry_point

main = entry_point("train")

if __name__ == "__main__":
    main()
