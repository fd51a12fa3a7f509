"""One typed configuration: the schema, and loading it from files and the command line.

    from simpletuner.config import load_settings
    settings = load_settings("config.toml", ["--learning_rate", "1e-4"])
"""

from simpletuner.config.load import Settings, load_config, load_datasets, load_settings
from simpletuner.config.schema import DatasetConfig, ParquetOptions, TrainingConfig

__all__ = ["DatasetConfig", "ParquetOptions", "Settings", "TrainingConfig", "load_config", "load_datasets",
           "load_settings"]
