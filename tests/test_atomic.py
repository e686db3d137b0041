"""Atomic writes: the file appears whole or not at all; a failed write leaves the old file and no litter."""
import json

import pytest

from shared.atomic import atomic_path, write_json_atomic, write_text_atomic


def test_replaces_whole_and_keeps_the_suffix(tmp_path):
    p = tmp_path / "sub" / "report.json"
    write_json_atomic(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    with atomic_path(p) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == p.parent and not tmp.exists()
        tmp.write_text("{}")
        assert json.loads(p.read_text()) == {"a": 1}          # not replaced before the block ends
    assert p.read_text() == "{}" and sorted(x.name for x in p.parent.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    p = tmp_path / "m.jsonl"
    write_text_atomic(p, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old\n" and [x.name for x in tmp_path.iterdir()] == ["m.jsonl"]
