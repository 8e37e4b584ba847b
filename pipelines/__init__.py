"""Kedro pipeline definitions (importable as ``imsvd_pipelines``): thin wiring only."""
