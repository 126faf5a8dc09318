"""Every file in configs/ loads and validates; a bad key in any of them is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import ConfigError, load_config
from launcher.cli import main

ALL = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SPACES = [p for p in ALL if p.name.endswith("_space.yaml")]  # `recgpt tune --space` files
CONFIGS = [p for p in ALL if p not in SPACES]


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "lora_adversarial.yaml", "gpt2_zero2_gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    if cfg.train.eval_interval and cfg.train.checkpoint_interval:
        assert cfg.train.checkpoint_interval % cfg.train.eval_interval == 0


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_search_space_parses_and_every_value_is_a_valid_config(path):
    from configs import to_dict
    from launcher.tune_cmd import check_space, parse_space

    params = parse_space(path)
    assert params
    check_space(params, to_dict(load_config(Path(path).parent / "demo_base.yaml")), path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("override, key", [("train.bogus=1", "train.bogus"), ("zero.stage=5", "zero.stage")])
def test_bad_override_is_one_line_exit_2(path, override, key, capsys):
    assert main(["train", "--config", str(path), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and err[0].startswith("recgpt train: error:"), err


def test_bad_key_inside_a_copy_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIGS[0].read_text() + "\ntrain_extra:\n  x: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_extra" in err[0], err


def test_a_misspelt_override_is_not_blamed_on_the_file(tmp_path):
    """The error names the file only when the file is wrong (the trial's ``trian.max_bad_steps=3``)."""
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS[0], ["trian.max_bad_steps=3"])
    assert str(e.value) == "trian: unknown key"
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  max_bad_steps: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["train.max_steps=3"])
    assert str(e.value) == f"{bad}: trian: unknown key"


def test_an_override_without_a_value_says_so():
    for bad in ("train.max_bad_steps=", "train.max_bad_steps=null"):
        with pytest.raises(ConfigError) as e:
            load_config(CONFIGS[0], [bad])
        assert str(e.value) == "train.max_bad_steps: needs a value, not null or empty"
    with pytest.raises(ConfigError, match="^=3: overrides are key=value"):
        load_config(CONFIGS[0], ["=3"])


def test_checkpoint_interval_must_be_a_multiple_of_eval_interval():
    with pytest.raises(ConfigError, match="train.checkpoint_interval"):
        load_config(CONFIGS[0], ["train.eval_interval=20", "train.checkpoint_interval=30"])


# --------------------------------------------------------------------------- the schema itself


def _sections():
    """RecGPTConfig, ShardsConfig and every section dataclass of RecGPTConfig."""
    import dataclasses

    from configs import RecGPTConfig, ShardsConfig

    root = RecGPTConfig()
    nested = [
        type(getattr(root, f.name))
        for f in dataclasses.fields(root)
        if dataclasses.is_dataclass(getattr(root, f.name))
    ]
    return [RecGPTConfig, ShardsConfig, *nested]


@pytest.mark.parametrize("section", _sections(), ids=lambda c: c.__name__)
def test_every_field_has_one_docstring(section):
    import dataclasses

    from configs import field_docs

    docs = field_docs(section)
    fields = [f.name for f in dataclasses.fields(section)]
    assert [n for n in fields if not docs.get(n)] == []  # sections of RecGPTConfig included


def test_shards_flags_are_generated_from_the_schema(capsys):
    import dataclasses

    from configs import ShardsConfig, field_docs
    from launcher.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["shards", "build", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(ShardsConfig):
        assert "--" + f.name.replace("_", "-") in help_text
        assert f"[shards.{f.name}; default {getattr(ShardsConfig(), f.name)}]" in help_text
        assert " ".join(field_docs(ShardsConfig)[f.name].split()[:4]) in help_text


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--max-history", "0"], "shards.max_history"),
        (["--window-stride", "99"], "shards.window_stride"),
        (["--min-user-interactions", "2"], "shards.min_user_interactions"),
        (["shards.records_per_member=x"], "shards.records_per_member"),
        (["bogus=1"], "shards.bogus"),
    ],
)
def test_bad_shards_setting_names_the_key(tmp_path, capsys, argv, key):
    from tests.conftest import SAMPLE

    assert main(["shards", "build", str(SAMPLE), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "--" not in err[0], err
    assert not (tmp_path / "out").exists()


def test_shards_yaml_then_flags_then_overrides():
    from configs import load_shards_config

    cfg_file = Path(__file__).parent / "_shards_tmp.yaml"
    try:
        cfg_file.write_text("shards:\n  max_history: 20\n  window_stride: 5\n")
        cfg = load_shards_config(cfg_file, ["window_stride=4"], values={"max_history": 30})
        assert (cfg.max_history, cfg.window_stride) == (30, 4)
        assert load_shards_config(cfg_file).max_history == 20
    finally:
        cfg_file.unlink()


def test_saved_configs_of_older_versions_upgrade_user_files_do_not(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text(
        "zero:\n  stage: 2\n  bf16: true\nmodel:\n  preset: small\n  n_layer: 2\n  n_embd: 64\n  n_head: 2\n"
    )
    cfg = load_config(old, saved=True)
    assert cfg.train.precision == "bf16" and cfg.model.shape() == {"n_layer": 4, "n_embd": 256, "n_head": 4}
    with pytest.raises(ConfigError, match="zero.bf16"):
        load_config(old)


def test_preset_shape_overrides_and_name_or_path_rejects_them():
    assert load_config(None, ["model.preset=small", "model.n_layer=6"]).model.shape() == {
        "n_layer": 6, "n_embd": 256, "n_head": 4,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="model.n_layer"):
        load_config(None, ["model.preset=null", "model.name_or_path=gpt2", "model.n_layer=6"])


def test_data_max_history_may_not_exceed_the_shards_window(sample_shards):
    from data_shards.manifest import load_manifest
    from modeling.data import build_loader, resolve_max_history

    manifest = load_manifest(sample_shards)
    assert resolve_max_history(load_config(None, []), manifest, sample_shards) == manifest["max_history"]
    assert resolve_max_history(load_config(None, ["data.max_history=10"]), manifest, sample_shards) == 10
    too_long = load_config(
        None, [f"data.shards={sample_shards}", f"data.max_history={manifest['max_history'] + 1}"]
    )
    with pytest.raises(ConfigError, match="data.max_history"):
        build_loader(too_long, "valid", tokenizer=object())


def test_configs_is_lazy_so_serving_need_not_import_the_schema():
    import subprocess
    import sys

    code = "import sys; from configs import ExportError, sha256_file; print('configs.schema' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
