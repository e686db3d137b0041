"""Distractor names: real, deduplicated, never a glossary term; their cache table changes alone."""
import json

import numpy as np
import pytest

from shared.cache import FeatureCache, TablePlan
from shared.distractors import TABLE, builtin_names, ensure_table, load_distractors, select


def test_select_drops_glossary_forms_duplicates_and_non_names():
    got = select(["Paris", "paris", "Nintendo", "São Paulo", "R2D2", "", "Lyon", "Nice"], 3,
                 exclude=["nintendo", "NICE"])
    assert got == ["Paris", "Sao Paulo", "Lyon"]


def test_builtin_mixes_real_places_and_persons():
    names = builtin_names()
    assert len(names) > 100_000
    assert names[:4] == ["China", "James", "India", "John"]          # most populous / most frequent first
    got = load_distractors("builtin", 1000, exclude=["china", "john"])
    assert len(got) == 1000 and "China" not in got and "John" not in got
    assert "Tokyo" in got and "Mary" in got


def test_a_file_source(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("Alpha\nBeta\n\nGamma\n")
    assert load_distractors(str(f), 10, exclude=["beta"]) == ["Alpha", "Gamma"]
    assert load_distractors("", 10) == []


def _cache(root):
    cache = FeatureCache.create(root, fingerprint={"backbone": {"kind": "x"}},
                                tables={"audio/train": TablePlan(2, 8)}, dims={"audio": 4, "text": 4})
    cache.table("audio/train").write_shard(0, ["a", "b"], [np.ones((3, 4), np.float32)] * 2)
    return cache


def test_the_table_is_added_replaced_and_removed_without_touching_the_audio(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("\n".join(f"Name{chr(65 + i)}" for i in range(20)))
    cache = _cache(tmp_path / "c")
    fp = dict(cache.fingerprint)
    audio_mark = (cache.root / "tables/audio/train/00000.done.json").read_text()
    cache = ensure_table(cache, str(f), 5, ["namea"], 4, log=lambda *_: None)
    assert cache.table(TABLE).plan.items == 5 and cache.table(TABLE).plan.shards == 2
    assert json.loads((cache.root / "distractors.json").read_text()) == ["NameB", "NameC", "NameD", "NameE", "NameF"]
    cache.table(TABLE).write_shard(0, ["0"], [np.ones((1, 4), np.float32)])
    assert ensure_table(cache, str(f), 5, ["namea"], 4, log=lambda *_: None) is cache     # same request: as is
    assert cache.table(TABLE).is_done(0)
    cache = ensure_table(cache, str(f), 7, ["namea"], 4, log=lambda *_: None)              # more: re-planned
    assert cache.table(TABLE).plan.items == 7 and not cache.table(TABLE).is_done(0)
    cache = ensure_table(cache, "", 7, [], 4, log=lambda *_: None)                         # none: removed
    assert TABLE not in cache.tables and not (cache.root / "distractors.json").exists()
    assert cache.fingerprint == fp
    assert (cache.root / "tables/audio/train/00000.done.json").read_text() == audio_mark
    assert cache.table("audio/train").is_done(0)


def test_a_missing_file_is_a_clear_error(tmp_path):
    from shared.errors import BadInput
    with pytest.raises(BadInput, match="distractor file does not exist"):
        load_distractors(str(tmp_path / "none.txt"), 10)


def test_clashes_are_word_level_both_ways_and_spoken_words():
    from shared.distractors import clashes
    names = ["Jordan", "Michael Jordan Jr", "Jordanville", "Will", "Willow", "New York", "York", "Grace",
             "San Jose", "Paris"]
    forms = ["michael jordan", "new york city", "Kubernetes"]
    said = ["I will go to san jose", "grace, said the willows", "paris-based"]
    gloss, spoken = clashes(names, forms, said)
    # Jordan is inside "michael jordan"; "Michael Jordan Jr" holds it; New York and York are inside
    # "new york city"; Jordanville and Willow share letters, not words
    assert gloss.tolist() == [True, True, False, False, False, True, True, False, False, False]
    # "will", "grace" and "san jose" are words of the transcripts; "willows" is not "willow";
    # "paris-based" is one word
    assert spoken.tolist() == [False, False, False, True, False, False, False, True, True, False]
