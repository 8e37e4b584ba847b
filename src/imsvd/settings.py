"""Kedro project settings (Kedro glue: the method library never imports this)."""

from kedro.config import OmegaConfigLoader

from imsvd.hooks import LockHook, MlflowTrackingHook

# Order matters: the lock is taken before MLflow opens its run and released after it ends.
HOOKS = (LockHook(), MlflowTrackingHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
        "mlflow": ["mlflow*", "mlflow/**"],
    },
}
