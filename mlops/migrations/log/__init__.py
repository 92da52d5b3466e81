"""Revisions of the prediction log tables (mlops_predictions and companions); run by Alembic."""
