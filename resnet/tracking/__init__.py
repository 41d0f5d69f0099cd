"""Experiment tracking where teams already look: MLflow (a parent run per sweep, a child run per
trial, the winner's model registered) and TensorBoard (Tune's own event files, stepped by epoch).
Optional: it needs MLflow only when --mlflow (or MLFLOW_TRACKING_URI) asks for it."""
