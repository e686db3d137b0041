"""Readers for the users' formats (README, "Input formats") and our chunk manifest."""
import json

import pytest

from shared.errors import BadInput, RejectLog
from shared.glossary import load_glossary, normalize, read_alt2main
from shared.manifest import Chunk, read_chunks, read_segments, write_chunks

SEED_GLOSSARY = {
    "nintendo": {"term": "Nintendo", "short_description": "Japanese game company",
                 "target_translations": {"zh": "任天堂", "de": "Nintendo"}, "url": "https://x"},
    "paracetamol": {"term": "Paracetamol", "short_description": "pain killer", "target_translations": {}},
    "acetaminophen": {"term": "acetaminophen", "short_description": "same drug"},
    "new york city": {"term": "New York City", "short_description": "city"},
}


@pytest.fixture
def glossary_files(tmp_path):
    g = tmp_path / "glossary_filtered.json"
    g.write_text(json.dumps(SEED_GLOSSARY, ensure_ascii=False), encoding="utf-8")
    a = tmp_path / "alt2main.json"
    a.write_text(json.dumps({"Acetaminophen": "paracetamol", "big apple": "new york city",
                             "nyc": "big apple", "ghost": "not in glossary"}))
    return g, a


def test_normalize():
    assert normalize("  New   YORK, City. ") == "new york city"
    assert normalize("Ｎｉｎｔｅｎｄｏ") == "nintendo"   # NFKC folds full-width letters


def test_seed_glossary_with_aliases(glossary_files):
    g, a = glossary_files
    logs = []
    gl = load_glossary(g, a, log=logs.append)
    # the alias that is also a glossary key is folded into its main term
    assert gl.keys == ["new york city", "nintendo", "paracetamol"]
    assert gl.canonical("ACETAMINOPHEN") == "paracetamol"
    assert gl.canonical("NYC") == "new york city"          # alias chain followed
    assert gl.canonical("ghost") is None and gl.canonical("zelda") is None
    assert gl.id("Big Apple") == gl.id("new york city") == 0
    assert gl.text(gl.id("nintendo")) == "Nintendo"
    assert gl.text(gl.id("nintendo"), "short_description") == "Japanese game company"
    assert any("ignored 1 aliases" in m for m in logs)     # nothing dropped silently


def test_list_and_text_glossaries(tmp_path):
    j = tmp_path / "g.json"
    j.write_text(json.dumps(["Kubernetes", "kubernetes", {"term": "Docker"}]))
    assert load_glossary(j).keys == ["docker", "kubernetes"]
    t = tmp_path / "g.txt"
    t.write_text("# comment\nKubernetes\n\nAmoxicillin\n")
    gl = load_glossary(t)
    assert gl.keys == ["amoxicillin", "kubernetes"] and gl.text(1) == "Kubernetes"
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(BadInput, match="invalid JSON"):
        load_glossary(bad)


def test_alias_cycle_is_an_error(tmp_path):
    a = tmp_path / "alt2main.json"
    a.write_text(json.dumps({"a": "b", "b": "c", "c": "a"}))
    with pytest.raises(BadInput, match="alias cycle") as e:
        read_alt2main(a)
    assert str(a) in str(e.value)


def test_segments_tsv_with_offsets(tmp_path):
    p = tmp_path / "segs.tsv"
    p.write_text("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\n"
                 "s1\taudio/long.wav:16000:32000\t32000\tspk1\thello world\ten\n"
                 "s2\t/abs/x.wav\t100\tspk2\tbye\ten\n")
    s1, s2 = read_segments(p)
    import os
    cwd = os.getcwd()
    os.chdir(tmp_path.parent)
    try:  # a TSV named by a relative path still gives absolute audio paths
        assert read_segments(tmp_path.name + "/segs.tsv")[0].audio == str(tmp_path / "audio/long.wav")
    finally:
        os.chdir(cwd)
    assert s1.audio == str(tmp_path / "audio/long.wav") and s1.offset == 16000 and s1.num_samples == 32000
    assert s1.start == 1.0 and s1.duration == 2.0 and s1.speaker == "spk1"
    assert s2.audio == "/abs/x.wav" and s2.offset == 0 and s2.duration is None
    p.write_text("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\ns1\tonly-two-columns\n")
    with pytest.raises(BadInput, match="line 2"):
        read_segments(p)


SEED_RECORD = {
    "segment_id": "POD0001_S1", "term_chunk_audio": "chunks/POD0001_S1_0.wav",
    "term_chunk_text": "we use kubernetes daily", "term_chunk_audio_ground_truth_terms": ["Nintendo"],
    "term_start_time": 1.2, "term_end_time": 1.9, "extended_start_time": 0.2, "extended_end_time": 2.9,
}


def test_seed_chunk_json_array_and_jsonl(tmp_path, glossary_files):
    gl = load_glossary(*glossary_files)
    arr = tmp_path / "term_level_chunks_0_500000.json"
    noterm = {**SEED_RECORD, "term_chunk_audio": "chunks/n.wav", "term_chunk_audio_ground_truth_terms": [],
              "is_no_term_chunk": True}
    arr.write_text(json.dumps([SEED_RECORD, noterm]))
    a, b = read_chunks(arr, gl)
    assert a.id == "POD0001_S1_0" and a.audio == str(tmp_path / "chunks/POD0001_S1_0.wav")
    assert a.terms == ["nintendo"] and a.audio_offset == 0 and a.audio_duration is None
    assert b.is_no_term_chunk and b.terms == []
    jl = tmp_path / "x.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [SEED_RECORD, noterm]) + "\n")
    assert [c.id for c in read_chunks(jl, gl)] == [a.id, b.id]


def test_manifest_roundtrip_keeps_extra_fields(tmp_path):
    c = Chunk(id="s1_t0", audio="/a.wav", audio_offset=1.5, audio_duration=2.25, term_chunk_text="hi x",
              term_chunk_audio_ground_truth_terms=["x"], segment_id="s1", speaker="spk", split="train",
              extra={"note": "kept"})
    p = tmp_path / "m.jsonl"
    write_chunks([c], p)
    (back,) = read_chunks(p)
    assert back == c
    assert not (tmp_path / "m.jsonl.tmp").exists()


def test_bad_records_stop_or_are_rejected(tmp_path, glossary_files):
    gl = load_glossary(*glossary_files)
    good = {"id": "c1", "audio": "/a.wav", "audio_offset": 0, "audio_duration": 1,
            "term_chunk_text": "t", "term_chunk_audio_ground_truth_terms": ["nintendo"]}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "id": "c2", "term_chunk_audio_ground_truth_terms": []}),
             json.dumps({**good, "id": "c3", "term_chunk_audio_ground_truth_terms": ["zelda"]}),
             json.dumps({k: v for k, v in good.items() if k != "term_chunk_text"} | {"id": "c4"}),
             json.dumps(good), json.dumps({**good, "id": "c5", "term_chunk_audio_ground_truth_terms": ["Acetaminophen"]})]
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput, match=r"train.jsonl, line 2: invalid JSON"):
        read_chunks(p, gl)
    rej = RejectLog(tmp_path / "rejected.jsonl")
    kept = read_chunks(p, gl, skip_bad=True, rejects=rej)
    assert [c.id for c in kept] == ["c1", "c5"] and kept[1].terms == ["paracetamol"]
    reasons = [r["reason"] for r in rej.items]
    assert len(kept) + len(rej) == len(lines)                    # read = kept + rejected
    assert [r["record"] for r in rej.items] == [2, 3, 4, 5, 6]
    assert "no terms and is not marked" in reasons[1] and "not in the glossary" in reasons[2]
    assert "missing required field term_chunk_text" in reasons[3] and "duplicate chunk id" in reasons[4]
    rej.write()
    assert len((tmp_path / "rejected.jsonl").read_text().splitlines()) == 5


def test_non_utf8_manifest(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    with pytest.raises(BadInput, match="non-UTF-8 bytes at line 2"):
        read_chunks(p)
