"""The ablation table: variants read from TOML, rows from reports, --only keeps the other rows."""
import json

import pytest

from shared.errors import BadInput
from stage3_index.ablation import _row, _write_table, read_variants, table_markdown


def test_variants_are_read_in_file_order_and_checked(tmp_path):
    p = tmp_path / "v.toml"
    p.write_text('[b]\nset = ["text.encoders=lm"]\n["a+c"]\nset = []\n')
    assert read_variants(p) == {"b": ["text.encoders=lm"], "a+c": []}
    p.write_text('[b]\nset = ["no equals sign"]\n')
    with pytest.raises(BadInput, match="variant 'b'"):
        read_variants(p)
    with pytest.raises(BadInput, match="does not exist"):
        read_variants(tmp_path / "missing.toml")


def report(r10, unseen, heldout=None):
    return {"recall": {"1": r10 / 2, "5": r10 - 0.1, "10": r10}, "recall_seen": {"10": 0.9},
            "recall_unseen": {"10": unseen}, "rejection": {"auroc": 0.95},
            "by_glossary_size": {"1000": {"recall": {"10": 0.8}}, "10000": {"recall": {"10": 0.7}}},
            "baseline": {"recall": {"10": 0.4}}, "fused": None}


def test_rows_and_the_table(tmp_path):
    a = _row("a", [], report(0.9, 0.7), {"recall": {"10": 0.85}, "baseline": {"recall": {"10": 0.74}}}, 12.3)
    assert (a["r10"], a["unseen_r10"], a["heldout_r10"], a["glossary"], a["glossary_r10"]) == (0.9, 0.7, 0.85, 10000, 0.7)
    md = table_markdown([a])
    assert "| a | 0.450 | 0.800 | 0.900 | 0.900 | 0.700 | 0.850 | 0.700 | 0.950 |" in md
    assert "| *cascade (ASR + fuzzy match)* | | | 0.400 | | | 0.740 |" in md
    b = _row("b", ["x.y=1"], report(0.5, 0.1), None, None)
    _write_table(tmp_path, [a, b], ["a", "b"])
    a2 = _row("a", [], report(0.95, 0.8), None, 10.0)
    _write_table(tmp_path, [a2], ["a", "b"])                       # --only a: b's row stays
    rows = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == ["a", "b"] and rows[0]["r10"] == 0.95 and rows[1]["r10"] == 0.5
