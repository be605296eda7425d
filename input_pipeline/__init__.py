"""SeMask input pipeline: TFDS builders (no tensorflow), grain loaders, synthetic data."""
from input_pipeline.config import default_data_config
from input_pipeline.info import DatasetInfo, dataset_info
from input_pipeline.pipeline import create_eval_iterator, create_train_iterator, make_global_batch

__all__ = ['DatasetInfo', 'create_eval_iterator', 'create_train_iterator', 'dataset_info',
           'default_data_config', 'make_global_batch']
