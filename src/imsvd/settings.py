"""Kedro project settings (Kedro glue: the method library never imports this)."""

from kedro.config import OmegaConfigLoader

from imsvd.hooks import LockHook, MlflowTrackingHook, ParameterCheckHook

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
}
