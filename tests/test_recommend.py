"""recgpt recommend: history resolution (ids, titles, ambiguity) and top-K from an export directory."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.cli import main
from modeling.export import ExportError, load_export, score_batch
from modeling.recommend import resolve_history
from tests.test_export import export_of, small_shards  # noqa: F401  (session fixtures, shared runs)

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


@pytest.mark.integration
@pytest.mark.slow
def test_recommend_cli(export_of, small_shards, tmp_path, capsys):  # noqa: F811
    _, out = export_of("lora-z2")
    model, tok, items, cfg = load_export(out)
    ids = [it["item_id"] for it in items]

    assert main(["recommend", "--model", str(out), "--history", ",".join(ids[:3]), "-k", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs = got["recommendations"]
    assert [r["rank"] for r in recs] == [1, 2, 3, 4] and got["history"] == ids[:3]
    assert all(r["score"] >= s["score"] for r, s in zip(recs, recs[1:]))
    assert {"item_id", "title", "score", "prob"} <= set(recs[0])

    # --exclude-seen never returns a history item; k counts what is left.
    history = [r["item_id"] for r in recs[:2]]
    assert main(["recommend", "--model", str(out), "--history", ",".join(history), "-k", "3", "--json",
                 "--exclude-seen"]) == 0  # fmt: skip
    recs2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recommendations"]
    assert len(recs2) == 3 and not {r["item_id"] for r in recs2} & set(history)

    # Titles from a JSON file, table output.
    hist = tmp_path / "h.json"
    hist.write_text(json.dumps([items[0]["title"], int(ids[1])]))
    assert main(["recommend", "--model", str(out), "--history-file", str(hist), "-k", "2"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split()[:3] == ["rank", "item_id", "score"] and len(table) == 3

    # Unknown items: one line, exit 2.
    assert main(["recommend", "--model", str(out), "--history", f"{ids[0]},no-such-id"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-id" in err[0]


@pytest.mark.integration
@pytest.mark.slow
def test_recommend_scores_equal_evaluation_prompt(export_of, small_shards):  # noqa: F811
    """recommend builds the prompt exactly as evaluation does: same logits for a valid record's history."""
    from data_shards.reader import ShardLoader
    from modeling.collate import make_collate
    from modeling.recommend import recommend

    _, out = export_of("lora-z2")
    model, tok, items, cfg = load_export(out)
    loader = ShardLoader(str(small_shards), split="valid", batch_size=1, num_workers=0)
    record = next(iter(loader))[0]
    batch = make_collate(cfg, tok, items, "valid")([record])
    want = score_batch(model, batch, cfg.task)[0]
    history = record["items"][:-1]
    top = recommend(model, tok, items, cfg, history, k=5, exclude_seen=False)
    best = want.topk(5)
    assert [r["item_id"] for r in top] == [items[i]["item_id"] for i in best.indices.tolist()]
    assert torch.allclose(torch.tensor([r["score"] for r in top]), best.values, atol=1e-5)
