"""recgpt's bottom layer: the typed config schema (every default once), loading/saving it, the one
error hierarchy and the shared file primitives. Imports nothing from the rest of the project.

Names are resolved lazily (PEP 562): ``from configs import ExportError`` loads only
``configs.errors``, so serving code can use the errors and file helpers without importing the
training schema.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "configs.errors": (
        "CheckpointError", "ConfigError", "CorruptShardError", "DataError", "ExportError", "RecgptError",
        "TrainingError", "one_line",
    ),
    "configs.files": ("atomic_write", "publish_dir", "sha256_bytes", "sha256_file"),
    "configs.load": (
        "RESOLVED_CONFIG", "config_from_dict", "load_config", "load_shards_config", "save_resolved", "to_dict",
        "to_yaml", "upgrade_saved",
    ),
    "configs.schema": (
        "AdversarialConfig", "DataConfig", "EvalConfig", "ExportConfig", "LoggingConfig", "LoraConfig",
        "ModelConfig", "OptimConfig", "PRESET_SHAPES", "RayConfig", "RecGPTConfig", "ScheduleConfig",
        "ShardsConfig", "TrainConfig", "ZeroConfig", "field_docs", "valid_metrics",
    ),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'configs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
