"""Loading and saving configs: defaults <- YAML overrides <- ``key=value`` overrides, validated.

The same function loads a user's YAML file and the resolved ``config.yaml`` saved beside every run,
checkpoint and export; :func:`upgrade_saved` maps the keys of configs saved by older recgpt versions
onto today's schema so old checkpoints still resume and export.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.errors import ConfigError
from configs.files import atomic_write
from configs.schema import PRESET_SHAPES, RecGPTConfig, ShardsConfig, validate_tree

T = TypeVar("T")
RESOLVED_CONFIG = "config.yaml"


def _omegaconf_error_line(err: OmegaConfBaseException, prefix: str = "") -> str:
    key = getattr(err, "full_key", None) or "config"
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Key '" in msg and "not in" in msg:
        msg = "unknown key"
    elif msg.startswith("Incompatible value 'None'"):
        # ``key=`` (nothing after the '=') reads as null: say so rather than OmegaConf's type talk.
        msg = "needs a value, not null or empty"
    return f"{prefix}{key}: {msg}"


def _read_yaml(path: str | os.PathLike) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        loaded = OmegaConf.load(p)
    except Exception as e:  # yaml errors carry line numbers
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{p}: expected a mapping of config keys")
    return loaded


def upgrade_saved(d: dict[str, Any]) -> dict[str, Any]:
    """Today's keys for a config dict saved by an earlier recgpt (idempotent).

    - ``zero.bf16`` / ``zero.fp16`` became ``train.precision``;
    - ``model.n_layer/n_embd/n_head`` are null for "the preset's shape" (they were ignored, with
      tiny's values saved, for the small and base presets);
    - ``data.max_history`` may be null (the shards' window); saved values stay as they are.
    """
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    zero = d.get("zero") or {}
    if "bf16" in zero or "fp16" in zero:
        bf16, fp16 = zero.pop("bf16", False), zero.pop("fp16", False)
        d.setdefault("train", {})["precision"] = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    model = d.get("model") or {}
    if model.get("preset") in ("small", "base"):
        for key in ("n_layer", "n_embd", "n_head"):
            if model.get(key) == PRESET_SHAPES["tiny"][key]:
                model[key] = None
    return d


def _merge(schema: type[T], layers: list[Any], source: str | None, overrides: tuple[str, ...]) -> T:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        line = _omegaconf_error_line(e)
        # The file (always the first layer) is named when it fails on its own: a misspelt override
        # (``trian.lr=1``; the error names only ``trian``) is the command line's, not the file's.
        if source is not None and (not overrides or _fails(schema, layers[0])):
            line = f"{source}: {line}"
        raise ConfigError(line) from None
    validate_tree(cfg)
    return cfg  # type: ignore[return-value]


def _fails(schema: type, layer: Any) -> bool:
    """Whether ``layer`` alone does not merge into ``schema``."""
    try:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), layer))
    except OmegaConfBaseException:
        return True
    return False


def _override_layer(overrides: list[str] | tuple[str, ...], prefix: str = "") -> list[Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{item}: overrides are key=value (e.g. train.max_steps=100)")
    if not overrides:
        return []
    try:
        return [OmegaConf.from_dotlist(list(overrides))]
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_error_line(e, prefix)) from None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    saved: bool = False,
) -> RecGPTConfig:
    """Defaults <- YAML file (overrides only) <- ``key=value`` overrides, validated.

    ``saved``: the file is a resolved ``config.yaml`` written by recgpt (a run, checkpoint or export),
    possibly by an older version: its keys go through :func:`upgrade_saved` first. A user's YAML never
    does — an outdated key there is an error naming it.
    Raises :class:`ConfigError` with one line naming the key (and the file) on any problem.
    """
    layers: list[Any] = []
    if path is not None:
        loaded = _read_yaml(path)
        layers.append(OmegaConf.create(upgrade_saved(OmegaConf.to_container(loaded))) if saved else loaded)
    layers += _override_layer(overrides)
    cfg = _merge(RecGPTConfig, layers, str(path) if path is not None else None, tuple(overrides))
    assert isinstance(cfg, RecGPTConfig)
    return cfg


def config_from_dict(d: dict[str, Any]) -> RecGPTConfig:
    """A validated config from a resolved-config dict (what :func:`to_dict` returned, maybe older)."""
    cfg = _merge(RecGPTConfig, [OmegaConf.create(upgrade_saved(d))], None, ())
    assert isinstance(cfg, RecGPTConfig)
    return cfg


@dataclasses.dataclass
class _ShardsRoot:
    """Wraps ShardsConfig so that OmegaConf's errors name keys as ``shards.<key>``."""

    shards: ShardsConfig = dataclasses.field(default_factory=ShardsConfig)

    def __post_init__(self) -> None:
        pass


def load_shards_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> ShardsConfig:
    """A :class:`ShardsConfig`: defaults <- YAML file (a ``shards:`` section, or its keys at the top
    level) <- ``values`` (field -> value, e.g. from CLI flags) <- ``key=value`` overrides (the
    ``shards.`` prefix is optional). Raises ConfigError naming ``shards.<key>``."""
    layers: list[Any] = []
    if path is not None:
        loaded = _read_yaml(path)
        layers.append(loaded if "shards" in loaded else OmegaConf.create({"shards": loaded}))
    if values:
        layers.append(OmegaConf.create({"shards": values}))
    for o in overrides:
        key = o.split("=", 1)[0]
        if "." in key and not key.startswith("shards."):
            raise ConfigError(
                f"{key}: not a shards setting (shards build takes shards.* keys, e.g. shards.max_history=20)"
            )
    layers += _override_layer([o if o.startswith("shards.") else f"shards.{o}" for o in overrides])
    root = _merge(_ShardsRoot, layers, str(path) if path is not None else None, tuple(overrides))
    return root.shards


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a resolved config (JSON/YAML-safe)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config (every key) as YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: Any, directory: str | os.PathLike) -> Path:
    """Write ``config.yaml`` (resolved, every key) into ``directory`` atomically; returns its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return atomic_write(d / RESOLVED_CONFIG, to_yaml(cfg))
