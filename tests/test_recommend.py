"""recgpt recommend: resolving a history (ids, titles with commas, repeated titles, unknown items).

The end-to-end recommend tests (top-K, --exclude-seen, --json, same prompt as evaluation) live in
tests/test_export.py next to the session runs whose exports they use.
"""

from __future__ import annotations

import pytest

from configs import ExportError
from modeling.recommend import resolve_history

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
