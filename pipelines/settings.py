"""Kedro project settings: hooks and the configuration loader."""

from imsvd_pipelines.hooks import LockHook, MlflowTrackingHook, ParameterCheckHook
from kedro.config import OmegaConfigLoader

# Parameters are checked before anything else; the lock is taken before MLflow opens its run.
HOOKS = (ParameterCheckHook(), LockHook(), MlflowTrackingHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
        "mlflow": ["mlflow*", "mlflow/**"],
    },
    # An environment (`kedro run --env fashion_mnist`) names only the values it changes:
    # "soft" merges its sections into base's key by key instead of replacing them whole.
    "merge_strategy": {"parameters": "soft"},
}
