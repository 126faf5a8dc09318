"""Periodic re-tuning: ``shards build --base``, ``train.init_from`` and scoring an older model on a later build."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import ConfigError, DataError, ShardsConfig, load_config
from data_shards.build import build_shards
from data_shards.manifest import load_manifest, read_items, verify
from data_shards.reader import ShardLoader
from launcher.cli import main as cli_main
from modeling.factory import build_model_and_tokenizer, cooccurrence_pmi
from modeling.warm_start import WarmStart
from tests.conftest import REPO, subprocess_env

HEADER = ["user_id", "item_id", "rating", "timestamp", "title"]
OLD_ITEMS = [str(i) for i in range(10, 22)]  # 12 items
# The new period: user "u1" 4 new events, "u2" 1, "u3" none; new users "n1"/"n2" (4 each); new items
# "5" (numerically before every old id: appended anyway) and "99".
NEW_EVENTS = {
    "u1": ["12", "5", "13", "99"],
    "u2": ["14"],
    "n1": ["10", "5", "11", "99"],
    "n2": ["99", "12", "5", "16"],
    "u4": ["15", "17", "5"],
    "u5": ["18", "19"],
}


def _write(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


def _old_rows() -> list[tuple]:
    rows = []
    for u in range(6):
        for k in range(7):  # 7 events each, distinct items, times 1..
            item = OLD_ITEMS[(u * 3 + k * 5) % len(OLD_ITEMS)]
            rows.append((f"u{u}", item, 1 + (u + k) % 5, 100 + 10 * k + u, f"title {item}"))
    return rows


def _new_rows(start: int = 1000) -> list[tuple]:
    rows = []
    for user, items in NEW_EVENTS.items():
        for k, item in enumerate(items):
            rows.append((user, item, 4, start + 10 * k, f"title {item}"))
    return rows


def _cfg(**kw) -> ShardsConfig:
    return ShardsConfig(format="csv", rating_col="rating", title_col="title", min_user_interactions=3,
                        max_history=4, records_per_member=4, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def periods(tmp_path_factory) -> dict[str, Path]:
    """Base shards of the old period and two periodic builds on top (with and without the base's
    training records); the old and new logs."""
    root = tmp_path_factory.mktemp("periods")
    old_log, new_log = _write(root / "old.csv", _old_rows()), _write(root / "new.csv", _new_rows())
    build_shards(old_log, root / "old", _cfg())
    build_shards(new_log, root / "all", _cfg(base=str(root / "old")))
    build_shards(new_log, root / "new", _cfg(base=str(root / "old"), carry_base_train=False))
    return {"root": root, "old": root / "old", "all": root / "all", "new": root / "new", "new_log": new_log}


def _records(location: Path, split: str) -> list[dict]:
    loader = ShardLoader(location, split, batch_size=64, num_workers=0, shuffle=False, drop_last=False)
    return [r for batch in loader for r in batch if not r.get("pad")]


def test_base_build_keeps_indices_and_continues_histories(periods):
    old_items, new_items = read_items(periods["old"]), read_items(periods["all"])
    ids = [it["item_id"] for it in new_items]
    assert ids[: len(old_items)] == [it["item_id"] for it in old_items]  # every old id keeps its index
    assert ids[len(old_items) :] == ["5", "99"]  # new ones appended, in natural order
    counts = {it["item_id"]: it["count"] for it in new_items}
    assert counts["5"] == 4 and counts["12"] == sum(r[1] == "12" for r in _old_rows()) + 2

    index = {i: n for n, i in enumerate(ids)}
    old_test = {r["user"]: r for r in _records(periods["old"], "test")}
    test, valid = (
        {r["user"]: r for r in _records(periods["all"], "test")},
        {r["user"]: r for r in _records(periods["all"], "valid")},
    )
    # Eval records only for users with >= 2 new interactions; targets are their last two new ones.
    assert sorted(test) == ["n1", "n2", "u1", "u4", "u5"]
    for user in test:
        assert test[user]["items"][-1] == index[NEW_EVENTS[user][-1]]
        assert valid[user]["items"][-1] == index[NEW_EVENTS[user][-2]]
    # u1's history continues from the base: the new window reaches back into the old period and
    # ``seen`` holds the whole old history plus the new events before the target.
    u1 = test["u1"]
    assert u1["items"] == (old_test["u1"]["items"] + [index[i] for i in NEW_EVENTS["u1"]])[-5:]
    assert set(u1["seen"]) == set(old_test["u1"]["seen"]) | {old_test["u1"]["items"][-1]} | {
        index[i] for i in NEW_EVENTS["u1"][:-1]
    }
    # u5 (2 new events): its history is entirely the base's tail.
    assert test["u5"]["items"][:-1] == (old_test["u5"]["items"] + [index["18"]])[-4:]

    manifest = load_manifest(periods["all"])
    assert manifest["base"]["fingerprint"] == load_manifest(periods["old"])["fingerprint"]
    assert manifest["period"]["new_items"] == 2 and manifest["period"]["new_users"] == 2
    assert manifest["num_interactions"] == len(_old_rows()) + len(_new_rows())
    assert verify(periods["all"])[1] == []


def test_base_build_train_records(periods):
    old_train = _records(periods["old"], "train")
    carried, new_only = _records(periods["all"], "train"), _records(periods["new"], "train")
    key = lambda r: (r["user"], tuple(r["items"]))  # noqa: E731
    assert sorted(map(key, carried)) == sorted(map(key, old_train + new_only))
    # The new targets: the base's held-out valid/test targets and new events, not the new eval targets.
    old_test = {r["user"]: r for r in _records(periods["old"], "test")}
    targets: dict[str, list[int]] = {}
    for r in new_only:
        targets.setdefault(r["user"], []).extend(r["items"][r["first_new_target"] :])
    ids = [it["item_id"] for it in read_items(periods["new"])]
    index = {i: n for n, i in enumerate(ids)}
    assert targets["u3"] == old_test["u3"]["items"][-2:]  # no new events: the old valid + test targets
    assert targets["u2"] == old_test["u2"]["items"][-2:] + [index["14"]]  # one new event: trained
    assert targets["u1"] == old_test["u1"]["items"][-2:] + [index["12"], index["5"]]
    assert targets["n1"] == [index["5"]]  # a new user: every event but the first and the eval targets
    # Both builds score the same records.
    for split in ("valid", "test"):
        assert (
            load_manifest(periods["all"])["splits"][split] == load_manifest(periods["new"])["splits"][split]
        )


def test_periodic_builds_chain(periods, tmp_path):
    """A third period on top of the second (its histories.jsonl): u2's single period-2 event (trained
    there) is history now; period 2's held-out targets are trained now."""
    log = _write(tmp_path / "p3.csv", [("u2", "20", 5, 5000, "title 20"), ("u2", "21", 5, 5010, "title 21")])
    build_shards(log, tmp_path / "p3", _cfg(base=str(periods["new"]), carry_base_train=False))
    ids = [it["item_id"] for it in read_items(tmp_path / "p3")]
    assert ids == [it["item_id"] for it in read_items(periods["new"])]
    (test,) = _records(tmp_path / "p3", "test")
    index = {i: n for n, i in enumerate(ids)}
    assert test["user"] == "u2" and test["items"][-3:] == [index["14"], index["20"], index["21"]]
    # Training targets: period 2's held-out valid/test targets (trainable now), nothing trained there.
    targets: dict[str, list[int]] = {}
    for r in _records(tmp_path / "p3", "train"):
        targets.setdefault(r["user"], []).extend(r["items"][r["first_new_target"] :])
    held_out = {r["user"]: [r["items"][-1]] for r in _records(periods["new"], "valid")}
    for r in _records(periods["new"], "test"):
        held_out[r["user"]].append(r["items"][-1])
    assert targets == held_out


def test_base_build_refuses_bad_input(periods, tmp_path, capsys):
    new_log, old = periods["new_log"], str(periods["old"])
    with pytest.raises(DataError, match="shards.base: .*manifest.json"):
        build_shards(new_log, tmp_path / "a", _cfg(base=str(tmp_path / "missing")))
    with pytest.raises(DataError, match=r"shards.max_history: 5 here, 4 in the base"):
        build_shards(
            new_log, tmp_path / "b", ShardsConfig(**{**_cfg().__dict__, "max_history": 5, "base": old})
        )
    renamed = tmp_path / "renamed.csv"  # the item ids of another column
    renamed.write_text(new_log.read_text().replace("item_id", "movie", 1))
    with pytest.raises(DataError, match=r"shards.item_col: 'movie' here, 'item_id' in the base"):
        build_shards(
            renamed, tmp_path / "c", ShardsConfig(**{**_cfg().__dict__, "item_col": "movie", "base": old})
        )
    # The whole log again instead of only the new period.
    full = _write(tmp_path / "full.csv", _old_rows() + _new_rows())
    with pytest.raises(DataError, match="older than the same user's last interaction in the base"):
        build_shards(full, tmp_path / "d", _cfg(base=old))
    # The CLI: one line, exit 2.
    code = cli_main(["shards", "build", str(new_log), "--out", str(tmp_path / "e"), "--format", "csv",
                     "--base", str(tmp_path / "missing")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("recgpt shards: error: shards.base:")


# --------------------------------------------------------------------------- train.init_from


def _model_cfg(shards: Path, *overrides: str):
    return load_config(None, [f"data.shards={shards}", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
                              "model.tokenizer_vocab_size=280", "model.dropout=0.0", *overrides])  # fmt: skip


def _rows(model) -> torch.Tensor:
    """Every token's input embedding [V, H] as the model computes it (under LoRA: PEFT's trainable
    item rows included)."""
    return model.lm.get_input_embeddings()(torch.arange(int(model.item_token_ids[-1]) + 1)).detach()


def _warm(source_model, tokenizer, items, cfg, tmp: Path) -> WarmStart:
    tokenizer.save_pretrained(str(tmp))
    lm = source_model.lm
    first = int(source_model.item_token_ids[0])
    state = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    return WarmStart(str(tmp), "export", cfg, state, tmp, items, first, None, {})


@pytest.mark.parametrize("init", ["mean", "cooccurrence"])
@pytest.mark.parametrize("lora", [False, True])
def test_warm_start_rows_by_item_id(periods, tmp_path, init, lora):
    old_cfg = _model_cfg(periods["old"])
    src, tok = build_model_and_tokenizer(old_cfg, periods["old"])
    with torch.no_grad():  # "trained" weights: anything but the initial ones
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    old_items = read_items(periods["old"])
    warm = _warm(src, tok, old_items, old_cfg, tmp_path / "src")
    cfg = _model_cfg(
        periods["all"], f"model.item_init={init}", f"lora.enabled={lora}", f"train.init_from={tmp_path}"
    )
    model, tokenizer = build_model_and_tokenizer(cfg, periods["all"], warm_start=warm)
    new_items = read_items(periods["all"])
    first = int(model.item_token_ids[0])
    assert first == warm.first_item == len(tokenizer)  # item ids follow the tokenizer's own
    old, new = _rows(src), _rows(model)
    assert model.causal_lm.config.vocab_size == first + len(new_items)
    assert torch.equal(new[:first], old[:first])  # every other token row and weight is the source's
    for j, it in enumerate(new_items):  # known items: the row of the same item id
        i = next((k for k, o in enumerate(old_items) if o["item_id"] == it["item_id"]), None)
        if i is not None:
            assert torch.equal(new[first + j], old[first + i])
    assert warm.info["items"] == {"known": 12, "new": 2, "dropped": 0, "item_init": init}
    known = old[first : first + 12]
    fresh = new[first + 12 :]
    if init == "mean":  # the known rows' mean plus noise of 0.1 x their std
        assert (fresh - known.mean(0)).abs().max() < 0.6 * known.std()
    else:  # the PMI-weighted mean of the known items each new item co-occurs with
        pmi = cooccurrence_pmi(cfg, periods["all"], len(new_items)).to_dense()
        weights = pmi[12:, :12]
        assert (weights.sum(1) > 0).all()
        expected = weights @ known / weights.sum(1, keepdim=True)
        torch.testing.assert_close(fresh, expected, rtol=1e-5, atol=1e-6)
    # Every other weight is the source's (under LoRA: the base layer, the fresh adapters adding zero).
    merged = model.lm.merge_and_unload() if lora else model.lm
    weights = merged.state_dict()
    for name, value in src.lm.state_dict().items():
        if weights[name].shape == value.shape:  # the embedding (tied head) is checked row by row above
            torch.testing.assert_close(weights[name], value)
    # Another model shape: refused naming the key (before anything is built), or, built anyway, by weight.
    from trainer.warm_start import check_same_model

    with pytest.raises(ConfigError, match="train.init_from: model.n_embd is 32 here, 16 in the source"):
        check_same_model(old_cfg, _model_cfg(periods["all"], "model.n_embd=32"), "the source")
    with pytest.raises(
        ConfigError, match="train.init_from: the weights of .* do not fit this model .missing"
    ):
        build_model_and_tokenizer(
            _model_cfg(periods["all"], "model.n_layer=2"), periods["all"], warm_start=warm
        )


def test_init_from_refuses_resume_path():
    with pytest.raises(ConfigError, match="train.init_from: starts a new run from weights"):
        load_config(None, ["train.init_from=x", "train.resume=runs/a/checkpoints/step_00000010"])


# --------------------------------------------------------------------------- end to end (one process)


def _train(shards: Path, out: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "launcher", "train", "--config", "configs/tiny.yaml", f"data.shards={shards}",
           f"train.output_dir={out}", "train.max_steps=2", "train.eval_interval=0", "train.checkpoint_interval=0",
           "data.num_workers=0", "train.micro_batch_size=4", "eval.batch_size=8", "schedule.warmup_steps=0",
           "model.tokenizer_vocab_size=280", "logging.tensorboard=false", "logging.progress=none", *overrides]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def old_model(periods, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, export) of a LoRA model trained 2 steps on the old period."""
    from trainer.export import export_checkpoint

    root = tmp_path_factory.mktemp("old-model")
    old_run, old_export = root / "old", root / "old-export"
    _train(periods["old"], old_run, "lora.enabled=true", "optim.lr=0.05")
    export_checkpoint(old_run, old_export)
    return old_run, old_export


@pytest.mark.slow
@pytest.mark.integration
def test_init_from_export_and_checkpoint_end_to_end(periods, old_model, tmp_path):
    """Old model (LoRA) -> export; the export and the checkpoint give the same source weights (LoRA
    merged); a run warm-started from the export (full tuning; LoRA warm starts: the unit test above)
    exports both vocabularies; the old export scored on the new build counts the targets it cannot know."""
    from trainer.evaluate import evaluate_export
    from trainer.export import export_checkpoint
    from trainer.warm_start import load_source

    old_run, old_export = old_model
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [f"data.shards={periods['new']}", "model.tokenizer_vocab_size=280"]
    )
    from_export = load_source(load_config(None, [*_as_overrides(cfg), f"train.init_from={old_export}"]))
    from_ckpt = load_source(load_config(None, [*_as_overrides(cfg), f"train.init_from={old_run}"]))
    assert [it["item_id"] for it in from_export.items] == [it["item_id"] for it in from_ckpt.items]
    assert from_export.first_item == from_ckpt.first_item
    assert from_export.state.keys() == from_ckpt.state.keys()
    for k in from_ckpt.state:  # the export holds the merged checkpoint weights
        torch.testing.assert_close(from_export.state[k], from_ckpt.state[k], atol=1e-5, rtol=1e-5)
    assert (
        from_ckpt.info["step"] == 2
        and from_ckpt.info["data"]["fingerprint"] == load_manifest(periods["old"])["fingerprint"]
    )

    new_run, new_export = tmp_path / "new", tmp_path / "new-export"
    _train(periods["new"], new_run, f"train.init_from={old_export}")
    export_checkpoint(new_run, new_export)
    manifest = json.loads((new_export / "export_manifest.json").read_text())
    ws = manifest["warm_start"]
    assert ws["kind"] == "export" and ws["source"] == str(old_export) and ws["items"]["known"] == 12
    assert (
        ws["items"]["new"] == 2
        and ws["new_items"]["base_fingerprint"] == load_manifest(periods["old"])["fingerprint"]
    )
    source_items = [
        json.loads(line)["item_id"] for line in (new_export / "source_items.jsonl").read_text().splitlines()
    ]
    assert source_items == [it["item_id"] for it in read_items(periods["old"])]
    assert len((new_export / "items.jsonl").read_text().splitlines()) == 14
    # Resuming a warm-started run with another source is refused (one line naming the key).
    with pytest.raises(ConfigError, match="train.init_from: .* it cannot change on resume"):
        from trainer.resume import refuse_fixed_changes

        saved = load_config(new_run / "config.yaml", saved=True)
        refuse_fixed_changes(
            saved, load_config(new_run / "config.yaml", [f"train.init_from={old_run}"], saved=True), "ckpt"
        )
    # The old export on the new period: targets that are new items are misses in the denominator.
    metrics = evaluate_export(old_export, "test", data=periods["new"])
    test = _records(periods["new"], "test")
    unknown = sum(r["items"][-1] >= 12 for r in test)
    assert unknown == 3  # u1 (99), n1 (99), u4 (5)
    assert metrics["num_examples"] == len(test) == 5
    assert metrics["unknown_targets"] == unknown and metrics["unknown_target_fraction"] == pytest.approx(
        unknown / 5
    )
    # 12 items < K = 20: every known target is a hit, every unknown one a miss
    assert metrics["hr@20"] == pytest.approx((5 - unknown) / 5)
    assert metrics["vocabulary"] == {"model_items": 12, "data_items": 14, "data_items_unknown_to_model": 2}


def _as_overrides(cfg) -> list[str]:
    return [f"data.shards={cfg.data.shards}", "model.tokenizer_vocab_size=280"]


def test_unknown_targets_are_misses_in_the_denominator():
    from modeling.metrics import MISS_RANK, compute_metrics

    cfg = load_config(None, ["eval.ks=[1,5]", "eval.metric=hr@5"])
    outputs = {
        "rank": torch.tensor([1, MISS_RANK, 3, MISS_RANK]),
        "unknown_target": torch.tensor([False, True, False, False]),
        "unknown_history": torch.tensor([False, False, False, True]),
    }
    m = compute_metrics(outputs, cfg)
    assert m["num_examples"] == 4 and m["unknown_targets"] == 1 and m["unknown_histories"] == 1
    assert m["unknown_target_fraction"] == 0.25
    assert m["hr@1"] == 0.25 and m["hr@5"] == 0.5 and m["mrr@5"] == pytest.approx((1 + 1 / 3) / 4)


@pytest.mark.s3
def test_base_build_reads_and_writes_s3(periods, s3, tmp_path):
    """A base in the object store (and the new build written there) gives the local build's records."""
    from tests.conftest import BUCKET

    old_url, new_url = f"s3://{BUCKET}/retune/old", f"s3://{BUCKET}/retune/new"
    build_shards(periods["root"] / "old.csv", old_url, _cfg())
    build_shards(periods["new_log"], new_url, _cfg(base=old_url))
    remote, local = load_manifest(new_url), load_manifest(periods["all"])
    assert remote["fingerprint"] == local["fingerprint"] and remote["base"]["location"] == old_url
    assert _records(new_url, "test") == _records(periods["all"], "test")


@pytest.mark.s3
@pytest.mark.slow
def test_init_from_an_export_in_the_store(periods, old_model, s3):
    from data_shards import storage
    from tests.conftest import BUCKET
    from trainer.warm_start import load_source

    url = f"s3://{BUCKET}/retune/old-export"
    storage.upload(old_model[1], url)
    cfg = load_config(
        None, [f"data.shards={periods['new']}", "model.tokenizer_vocab_size=280", f"train.init_from={url}"]
    )
    remote = load_source(cfg)
    local = load_source(load_config(None, [f"data.shards={periods['new']}", "model.tokenizer_vocab_size=280",
                                           f"train.init_from={old_model[1]}"]))  # fmt: skip
    assert remote.source == url and remote.kind == "export" and remote.items == local.items
    assert all(torch.equal(remote.state[k], local.state[k]) for k in local.state)
