"""imsvd: self-supervised image representation learning with IMSVD.

The method library (data, augmentation, models, losses, training, evaluation) lives
here and never imports Kedro; the Kedro glue is confined to ``settings.py``,
``pipeline_registry.py``, ``hooks.py`` and ``kedro_datasets.py``.
"""

__version__ = "0.1.0"
