"""The held-out voice split: Piper speech of sentences of its own (carriers no other split uses,
terms chosen against what the demo corpus speaks), the term spans from the voice's phoneme
alignments, determinism, the demo's glossary, and a `heldout` manifest."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from shared.errors import BadInput
from shared.glossary import load_glossary
from shared.manifest import read_chunks
from demo import corpus as dc
from demo import heldout as dh
from demo.glossary import lexicon, load_demo_terms
from demo.text import CARRIERS, SPLITS
from stage1_extract.extract import find_manifests
from stage1_extract.prepare import find_terms, prepare, read_words
from tests.test_demo_corpus import made_of

GLOSSARY = {k: {"term": t, "short_description": f"{t}.", "target_translations": {}}
            for k, t in (("kubernetes", "Kubernetes"), ("jeff bezos", "Jeff Bezos"),
                         ("docker", "Docker"), ("pneumonia", "Pneumonia"), ("linux", "Linux"),
                         ("mercedes", "Mercedes"))}
ALIASES = {"bezos": "jeff bezos", "benz": "mercedes"}
ROWS = [  # (id, speaker, text): spk14 is the fake corpus's dev speaker, spk17 its test speaker
    ("spk01_00001", "spk01", "We talked about Docker yesterday."),
    ("spk01_00002", "spk01", "We wrote it on Linux last year."),
    ("spk14_00001", "spk14", "The nurse said pneumonia twice."),
    ("spk17_00001", "spk17", "I read a long article about Kubernetes on the train."),
    ("spk17_00002", "spk17", "Some people confuse Bezos with Docker, but they differ."),
    ("spk17_00003", "spk17", "Let me check the time, we still have about twenty minutes."),
]
TERMS = 6     # two distinct terms, three times each: quick to speak


def fake_demo_corpus(folder: Path) -> Path:
    """What build_heldout_corpus reads of a demo corpus (no audio needed)."""
    folder.mkdir(parents=True)
    (folder / "glossary.json").write_text(json.dumps(GLOSSARY, indent=1))
    (folder / "alt2main.json").write_text(json.dumps(ALIASES))
    (folder / "splits.json").write_text(json.dumps({"dev_speakers": ["spk14"],
                                                    "test_speakers": ["spk17"]}))
    with open(folder / "segments.tsv", "w") as f:
        f.write("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\n")
        for sid, spk, text in ROWS:
            f.write(f"{sid}\taudio/{spk}.wav:0:16000\t16000\t{spk}\t{text}\ten\n")
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    src = fake_demo_corpus(root / "demo")
    summary = dh.build_heldout_corpus(src, root / "out", seed=0, term_target=TERMS, workers=2,
                                      verbose=False)
    return src, root / "out", summary


def forms() -> dict[str, str]:
    out = {k: k for k in GLOSSARY}
    out.update(ALIASES)
    return out


def fake_plan(src: Path) -> list[dict]:
    gloss = load_glossary(src / "glossary.json", src / "alt2main.json", log=lambda *_: None)
    return dh.plan_heldout(dh.display_forms(gloss), forms(), dh.spoken_terms(src, forms()), TERMS, 0)


# ---------------------------------------------------------------- pure parts

def test_term_pieces():
    tokens = "Some people confuse Bezos with Docker, but they differ.".split()
    assert dh.term_pieces(tokens, forms()) == [(0, 3, None), (3, 4, "jeff bezos"),
                                               (4, 5, None), (5, 6, "docker"), (6, 9, None)]


def test_choose_terms_keeps_away_from_test_while_it_can():
    keys = [f"k{i:02d}" for i in range(20)]
    spoken = {"train": set(keys[:10]), "dev": {"k10", "k11"} | set(keys[:3]),
              "test": {"k12", "k13"} | set(keys[:5])}
    never = set(keys[14:])                        # six terms the corpus never speaks
    unseen, seen = dh.choose_terms(keys, spoken, 7, 0.3, np.random.default_rng(0))
    assert len(unseen) == 3 and set(unseen) <= never
    assert len(seen) == 4 and set(seen) <= set(keys[5:10])      # spoken in train, not in test
    assert (unseen, seen) == dh.choose_terms(keys, spoken, 7, 0.3, np.random.default_rng(0))
    # pools run dry in order: never spoken, then dev-only, then test's unseen; train's other terms
    unseen, seen = dh.choose_terms(keys, spoken, 30, 0.4, np.random.default_rng(1))
    assert set(unseen[:6]) == never and set(unseen[6:8]) == {"k10", "k11"}
    assert set(unseen[8:]) == {"k12", "k13"}
    assert set(seen[:5]) == set(keys[5:10]) and set(seen[5:]) == set(keys[:5])


def test_plan_speaks_its_own_sentences_and_terms():
    """At the demo's size: 330 occurrences, 30% of the distinct terms never spoken in train, no
    term test speaks, every sentence made of the held-out carriers and of no other split's."""
    terms = load_demo_terms()
    occ = dc.plan_terms(terms, dc.split_targets(1.0), np.random.default_rng([0, 1]))
    spoken = {s: {k for _, k in v} for s, v in occ.items()}
    forms_ = {t.key: (t.term, t.aliases) for t in terms}
    rows = dh.plan_heldout(forms_, lexicon(terms), spoken, dh.TERM_TARGET, 0)
    assert rows == dh.plan_heldout(forms_, lexicon(terms), spoken, dh.TERM_TARGET, 0)
    keys = [k for r in rows for k in r["terms"]]
    distinct = set(keys)
    assert len(keys) == dh.TERM_TARGET == 330
    assert 0.25 <= len(distinct - spoken["train"]) / len(distinct) <= 0.35
    assert not distinct & spoken["test"]
    assert any(not r["terms"] for r in rows) and any(len(r["terms"]) == 2 for r in rows)
    # some occurrences are spoken as an alias, as in the corpus
    assert any(a.lower() in r["text"].lower() for r in rows for k in r["terms"] for a in forms_[k][1])
    used = {t for r in rows for t in r["templates"]}
    assert used <= set(CARRIERS["heldout"].all()) and len(used) >= 30
    for r in rows:
        assert made_of(r["text"], CARRIERS["heldout"]), r["text"]
        assert not any(made_of(r["text"], CARRIERS[s]) for s in SPLITS if s != "heldout"), r["text"]
    assert [r["id"] for r in rows] == [f"{dh.SPEAKER}_{i + 1:05d}" for i in range(len(rows))]


def test_fake_plan_shares_no_carrier_with_test(tmp_path):
    src = fake_demo_corpus(tmp_path / "demo")
    test_sentences = [t for _, s, t in ROWS if s == "spk17"]
    rows = fake_plan(src)
    assert sum(len(r["terms"]) for r in rows) == TERMS
    for r in rows:
        assert r["text"] not in test_sentences
        assert not made_of(r["text"], CARRIERS["test"]) and made_of(r["text"], CARRIERS["heldout"])
    # pneumonia (dev) and paracetamol are never spoken in train; python is spoken in train only
    # unseen: mercedes, the one term the corpus never speaks (before pneumonia, dev's); seen:
    # linux, which train speaks and test does not (docker is in both)
    assert {k for r in rows for k in r["terms"]} == {"mercedes", "linux"}


def test_spread_words_matches_or_shares_by_letters():
    groups = [(0.0, 10.0, 2), (12.0, 20.0, 3)]
    assert dh.spread_words(["ab", "cde"], groups) == [(0.0, 10.0), (12.0, 20.0)]
    # eSpeak merged "on the" into one phoneme word: the two words share it by letters
    spans = dh.spread_words(["read", "on", "the"], [(0.0, 8.0, 4), (10.0, 20.0, 4)])
    assert spans[0] == (0.0, 8.0)
    assert spans[1][0] == 10.0 and spans[2][1] == 20.0 and spans[1][1] == spans[2][0]
    assert spans[1][1] == pytest.approx(10.0 + 10.0 * 2 / 5)
    # more phoneme words than words: the spare one widens the word before it
    assert dh.spread_words(["x"], [(0.0, 1.0, 1), (2.0, 3.0, 1)]) == [(0.0, 3.0)]


def test_phoneme_words_drop_spaces_and_punctuation():
    phon = list("ab, cd.")     # a b , ' ' c d .
    bounds = np.arange(len(phon) + 1, dtype=np.float64) * 10
    assert dh.phoneme_words(phon, bounds) == [(0.0, 20.0, 2), (40.0, 60.0, 2)]


# ---------------------------------------------------------------- the build

def test_same_glossary_and_formats(built):
    src, out, summary = built
    for name in ("glossary.json", "alt2main.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    rows = [ln.split("\t") for ln in (out / "segments.tsv").read_text().splitlines()[1:]]
    assert {r[3] for r in rows} == {dh.SPEAKER}
    # what was planned is what was spoken, and none of it is a test sentence
    assert [(r[0], r[4]) for r in rows] == [(p["id"], p["text"]) for p in fake_plan(src)]
    assert not {r[4] for r in rows} & {t for _, s, t in ROWS}
    audio, sr = sf.read(out / "audio" / f"{dh.SPEAKER}.wav", dtype="float32")
    assert sr == 16000
    for r in rows:
        path, off, num = r[1].rsplit(":", 2)
        assert path == f"audio/{dh.SPEAKER}.wav" and int(off) + int(num) <= len(audio)
        assert (out / "alignments" / f"{r[0]}.TextGrid").is_file()
    assert summary["term_occurrences"] == TERMS and summary["segments"] == len(rows)
    assert summary["no_term_segments"] >= 1
    # mercedes is never spoken in the fake train split, linux is; neither in test
    assert summary["unseen_terms"] == 1 and summary["distinct_terms"] == 2
    assert summary["terms_shared_with_test"] == 0 and summary["unseen_share"] == 0.5


def test_term_spans_hold_the_speech(built):
    _, out, _ = built
    audio, sr = sf.read(out / "audio" / f"{dh.SPEAKER}.wav", dtype="float32")
    found = {}
    for line in (out / "segments.tsv").read_text().splitlines()[1:]:
        sid, ref = line.split("\t")[:2]
        _, off, num = ref.rsplit(":", 2)
        seg = audio[int(off):int(off) + int(num)]
        words = read_words(out / "alignments" / f"{sid}.TextGrid")
        assert len(words) == len(line.split("\t")[4].split())
        floor = max(float(np.sqrt(np.mean(seg[:1600] ** 2))), 1e-5)  # the 0.15 s+ lead silence
        for span in find_terms(words, forms()):
            a, b = span.start(words), span.end(words)
            found[span.key] = b - a
            inside = seg[int(a * sr):int(b * sr)]
            assert float(np.sqrt(np.mean(inside ** 2))) > 10 * floor
            # each 50 ms at the span's edges is speech too (the span is not padded with silence)
            for edge in (inside[:800], inside[-800:]):
                assert float(np.sqrt(np.mean(edge ** 2))) > 3 * floor
    assert set(found) == {"mercedes", "linux"}
    assert all(0.2 < d < 1.5 for d in found.values()), found


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "summary.json"}


def test_deterministic_whatever_the_workers_and_reused(built, tmp_path):
    src, out, _ = built
    again = dh.build_heldout_corpus(src, tmp_path / "again", seed=0, term_target=TERMS, workers=1,
                                    verbose=False)
    assert digest(tmp_path / "again") == digest(out)
    assert not again["reused"]
    result = CliRunner().invoke(dh.demo_heldout_command, ["--corpus", str(src), "--out", str(out),
                                                          "--terms", str(TERMS)])
    assert result.exit_code == 0, result.output
    assert "reusing" in result.output


def test_prepare_makes_a_heldout_manifest(built, tmp_path):
    _, out, _ = built
    chunks = tmp_path / "chunks"
    summary = prepare(out / "segments.tsv", out / "alignments", out / "glossary.json", chunks,
                      alt2main=out / "alt2main.json", context=0.6, split_by="none",
                      split_name="heldout", log=lambda *_: None)
    assert sorted(p.name for p in chunks.glob("*.jsonl")) == ["heldout.jsonl"]
    assert summary["splits"]["heldout"]["term_chunks"] == TERMS
    (chunks / "rejected.jsonl").write_text("")      # prepare's reject log is never a split
    manifests = find_manifests(chunks)
    assert list(manifests) == ["heldout"]
    gloss = load_glossary(out / "glossary.json", out / "alt2main.json", log=lambda *_: None)
    items = read_chunks(manifests["heldout"], gloss)
    assert {c.split for c in items} == {"heldout"}
    terms = [c for c in items if not c.is_no_term_chunk]
    # one chunk per occurrence, its own term first (a neighbour within the context may follow)
    assert sorted(c.term_chunk_audio_ground_truth_terms[0] for c in terms) == \
        ["linux"] * 3 + ["mercedes"] * 3
    assert any(c.is_no_term_chunk for c in items)


def test_split_name_rules(built, tmp_path):
    _, out, _ = built
    for split_by, name in (("ratio", "heldout"), ("none", "rejected"), ("none", "a/b")):
        with pytest.raises(BadInput, match="split-name"):
            prepare(out / "segments.tsv", out / "alignments", out / "glossary.json",
                    tmp_path / "o", split_by=split_by, split_name=name, log=lambda *_: None)
    # train/dev/test manifests keep taking precedence over any other manifest in the folder
    for name in ("train", "dev", "heldout"):
        (tmp_path / f"{name}.jsonl").write_text("")
    assert list(find_manifests(tmp_path)) == ["train", "dev"]


def test_cli_registers_the_command():
    from termret.cli import cli

    result = CliRunner().invoke(cli, ["demo-heldout", "--help"])
    assert result.exit_code == 0 and "--terms" in result.output and "--corpus" in result.output
