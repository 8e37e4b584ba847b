"""imsvd: self-supervised image representation learning with IMSVD.

The method library, one module per concern; none of it imports Kedro (the Kedro glue
is the ``imsvd_pipelines`` package in ``pipelines/``, and a test holds this):

- ``config``: typed, frozen parameter sections, one per pipeline and per method.
- ``data``, ``sources``, ``validation``: the canonical image set, where it comes from,
  and the Great Expectations suite that accepts it.
- ``augment`` (``recipe``, ``cache``, ``pairs``): the multiview recipe, the view cache
  and the pair datasets; ``preprocess``: normalisation shared by training and evaluation.
- ``models``, ``losses``, ``optim``, ``distributed``: backbones and heads, the losses,
  optimisers and schedules, cross-device batch norm.
- ``training`` (``module``, ``callbacks``, ``resume``, ``loop``): pretraining with Lightning.
- ``checkpoints``: safe loading and saving of weights, and the encoder file.
- ``inference``, ``metrics``, ``evaluate``, ``plots``: frozen features, the metric
  functions, the evaluation protocol that composes them, and the pictures.
- ``io``, ``errors``, ``tracking``: atomic writes, the project's errors, MLflow helpers.
"""

__version__ = "0.1.0"
