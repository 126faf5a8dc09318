"""recgpt recommend and the model commands' surface, without training.

Resolving a history (ids, titles with commas, repeated titles, unknown items); serving imports no
training schema; a small export written by ``modeling.export.write_export`` from an untrained model
(recommend leaves the history out by default, ``--include-seen`` keeps it; an existing directory is
replaced only with ``force``); removed flags are argparse errors. The end-to-end recommend tests on
trained exports (top-K, --json, same prompt as evaluation) live in tests/test_export.py next to the
session runs whose exports they use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from configs import ExportError, load_config
from launcher.cli import main
from modeling.serving import load_export, recommend, resolve_history, verify_export

REPO = Path(__file__).resolve().parent.parent

ITEMS = [
    {"index": 0, "item_id": "10", "title": "Emma (1996)"},
    {"index": 1, "item_id": "20", "title": "Heat (1995)"},
    {"index": 2, "item_id": "30", "title": "Emma (1996)"},
    {"index": 3, "item_id": "40", "title": "Crumb, Robert (1994)"},
    {"index": 4, "item_id": "1994", "title": "Poltergeist (1982)"},
]


def test_resolve_ids_titles_with_commas_and_numbers():
    assert resolve_history(["20", 10, "Crumb, Robert (1994)", 1994], ITEMS, "h") == [1, 0, 3, 4]


def test_ambiguous_title_lists_candidates():
    with pytest.raises(ExportError) as e:
        resolve_history(["Emma (1996)"], ITEMS, "--history-file h.json")
    msg = str(e.value)
    assert "matches 2 items" in msg and "id 10" in msg and "id 30" in msg and "\n" not in msg


def test_unknown_items_are_all_listed():
    with pytest.raises(ExportError, match="unknown items .*: 99, Nope"):
        resolve_history(["20", "99", "Nope"], ITEMS, "--history")
    with pytest.raises(ExportError, match="empty"):
        resolve_history([], ITEMS, "--history")


def test_serving_does_not_import_the_training_schema():
    code = (
        "import sys, modeling.serving; "
        "bad = [m for m in ('configs.schema', 'configs.load', 'trainer', 'modeling.factory') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--checkpoint", "run", "--out", "o", "--latest"],
        ["export", "--checkpoint", "run", "--out", "o", "--adapter-only"],
        ["evaluate", "--checkpoint", "run", "--config", "x.yaml"],
        ["recommend", "--model", "m", "--history", "1", "--exclude-seen"],
    ],
    ids=["export --latest", "export --adapter-only", "evaluate --config", "recommend --exclude-seen"],
)
def test_removed_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# --------------------------------------------------------------------------- a small export, untrained


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """``write_export`` of an untrained 1-layer GPT-2 over 6 items (no shards, no training, no parity
    batches): a real export directory in a second or two."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling.export import ExportSource, write_export
    from modeling.factory import model_vocab_size, reserve_item_tokens, train_tokenizer
    from modeling.model import RecModel

    items = [{"index": i, "item_id": str(100 + i), "title": f"Movie {i} (199{i})"} for i in range(6)]
    levels = [1.0, 2.0, 3.0, 4.0, 5.0]
    torch.manual_seed(0)
    tokenizer = train_tokenizer(items, levels, vocab_size=300)
    first, _ = reserve_item_tokens(tokenizer, items, levels, "test")
    config = GPT2Config(vocab_size=model_vocab_size(tokenizer), n_positions=64, n_layer=1, n_embd=16, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    lm = GPT2LMHeadModel(config).eval()
    model = RecModel(lm, torch.arange(first, first + len(items)), tied=True).eval()
    cfg = load_config(None, ["data.max_history=5"])
    out = tmp_path_factory.mktemp("recommend") / "model"
    source = ExportSource(checkpoint="none", step=0, trainer_state={"step": 0}, metrics=None, world_size=1)
    manifest = write_export(out, model, tokenizer, items, cfg, [], source)
    assert manifest["parity"]["batches"] == 0 and manifest["lora"]["adapter_dir"] is None
    return out


def test_small_export_loads_and_verifies(small_export):
    verify_export(small_export)
    model, tokenizer, items, spec = load_export(small_export, verify=True)
    assert spec.task == "next_item" and spec.prompt == "ids" and spec.max_history == 5 and spec.exclude_seen
    assert model.num_items == len(items) == 6 and model.tied
    # Editing a file is noticed.
    with open(small_export / "items.jsonl", "a") as f:
        f.write("\n")
    try:
        with pytest.raises(ExportError, match="items.jsonl"):
            verify_export(small_export)
    finally:
        (small_export / "items.jsonl").write_text((small_export / "items.jsonl").read_text()[:-1])
    verify_export(small_export)


def test_recommend_excludes_history_by_default(small_export, capsys):
    _, _, items, _ = load_export(small_export)
    ids = [it["item_id"] for it in items]
    history = ids[:2]

    def run(*extra: str) -> dict:
        argv = [
            "recommend",
            "--model",
            str(small_export),
            "--history",
            ",".join(history),
            "-k",
            "6",
            "--json",
        ]
        assert main([*argv, *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    default = run()
    got = [r["item_id"] for r in default["recommendations"]]
    assert default["exclude_seen"] is True and len(got) == 4 and not set(got) & set(history)
    included = run("--include-seen")
    got = [r["item_id"] for r in included["recommendations"]]
    assert included["exclude_seen"] is False and sorted(got) == sorted(ids)


def test_recommend_library_default_excludes(small_export):
    model, tokenizer, items, spec = load_export(small_export)
    rows = recommend(model, tokenizer, items, spec, [0, 1, 2], k=6)
    assert {r["item_id"] for r in rows} == {"103", "104", "105"}
    rows = recommend(model, tokenizer, items, spec, [0, 1, 2], k=6, exclude_seen=False)
    assert len(rows) == 6


def test_existing_directory_replaced_only_with_force(small_export, tmp_path, capsys):
    from modeling.export import check_out

    with pytest.raises(ExportError, match="exists"):
        check_out(small_export, force=False)
    assert check_out(small_export, force=True) == small_export.absolute()
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(small_export)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and "(--force replaces it)" in err[0], err


def test_recommend_builds_the_collate_and_lookups_once_per_export(small_export):
    """What every request on one loaded export shares (the collate's item table, the id lookups: ~1 s
    each at 1M items) is built once, and the answers stay the same."""
    import modeling.serving as serving

    model, tokenizer, items, spec = load_export(small_export)
    with mock.patch.object(serving, "make_collate", wraps=serving.make_collate) as made:
        first = recommend(model, tokenizer, items, spec, resolve_history(["100", "101"], items, "x"), k=3)
        again = recommend(model, tokenizer, items, spec, resolve_history(["100", "101"], items, "x"), k=3)
        other = recommend(model, tokenizer, items, spec, resolve_history(["102"], items, "x"), k=3)
    assert made.call_count == 1 and first == again and other != first
    # Another load (new objects) is not served from the first one's entries.
    model2, tokenizer2, items2, spec2 = load_export(small_export)
    with mock.patch.object(serving, "make_collate", wraps=serving.make_collate) as made:
        assert recommend(model2, tokenizer2, items2, spec2, [0, 1], k=3) == first
    assert made.call_count == 1
