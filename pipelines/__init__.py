"""The Kedro project package, importable as ``imsvd_pipelines``: all of the Kedro glue.

- ``settings.py``, ``pipeline_registry.py``: what Kedro reads to configure the project.
- ``hooks.py``: parameter check, project lock, one MLflow run per ``kedro run``.
- ``datasets.py``: catalog datasets that write atomically and load nothing executable.
- ``cli.py``: ``kedro run`` with the project's errors shown plainly.
- ``validate/``, ``augment/``, ``pretrain/``, ``evaluate/``: the pipelines, thin wiring
  over the method library :mod:`imsvd`, which never imports Kedro.
"""
