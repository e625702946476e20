#!/usr/bin/env bash
# An MLflow tracking server for a team: SQLite (or $MLFLOW_BACKEND_STORE_URI) for runs,
# artifacts proxied to $MLFLOW_ARTIFACTS_DESTINATION (e.g. s3://bucket/mlflow). Loopback by default.
set -euo pipefail
exec mlflow server \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow-server.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}" \
  --serve-artifacts
