"""recgpt's bottom layer: the typed config schema (every default once), loading/saving it, the one
error hierarchy and the shared file primitives. Imports nothing from the rest of the project."""

from configs.errors import (
    CheckpointError,
    ConfigError,
    CorruptShardError,
    DataError,
    ExportError,
    RecgptError,
    TrainingError,
    one_line,
)
from configs.files import atomic_write, sha256_bytes, sha256_file
from configs.load import (
    RESOLVED_CONFIG,
    config_from_dict,
    load_config,
    load_shards_config,
    save_resolved,
    to_dict,
    to_yaml,
)
from configs.schema import (
    AdversarialConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    RecGPTConfig,
    ScheduleConfig,
    ShardsConfig,
    TrainConfig,
    ZeroConfig,
    field_docs,
)

__all__ = [
    "AdversarialConfig", "CheckpointError", "ConfigError", "CorruptShardError", "DataConfig", "DataError",
    "EvalConfig", "ExportConfig", "ExportError", "LoggingConfig", "LoraConfig", "ModelConfig", "OptimConfig",
    "RESOLVED_CONFIG", "RayConfig", "RecGPTConfig", "RecgptError", "ScheduleConfig", "ShardsConfig",
    "TrainConfig", "TrainingError", "ZeroConfig", "atomic_write", "config_from_dict", "field_docs",
    "load_config", "load_shards_config", "one_line", "save_resolved", "sha256_bytes", "sha256_file",
    "to_dict", "to_yaml",
]  # fmt: skip
