"""SeMask input pipeline: TFDS builders (no tensorflow), grain loaders, synthetic data."""
from input_pipeline.config import default_data_config
from input_pipeline.info import DatasetInfo, dataset_info

_LOADERS = ('create_eval_iterator', 'create_train_iterator', 'make_global_batch')

__all__ = ['DatasetInfo', 'dataset_info', 'default_data_config', *_LOADERS]


def __getattr__(name: str):
  """The loaders on first use: they import grain (and with it orbax and tensorstore,
  ~50 MiB and 0.6 s), which the model, the bench and the config tools, importing this
  package for its constants, do not need."""
  if name in _LOADERS:
    from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f"module 'input_pipeline' has no attribute {name!r}")
