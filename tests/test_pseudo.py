"""Pseudo-terms: which words qualify, how prepare cuts their chunks, that no glossary word (of any
split) ever becomes one, the manifest field, and what extract caches for them."""
import json
import random

import numpy as np
import pytest
import soundfile as sf

from shared.cache import FeatureCache
from shared.config import load_config
from shared.errors import BadInput
from shared.glossary import load_glossary, normalize
from shared.manifest import Chunk, read_chunks, write_chunks
from stage1_extract.prepare import TermSpan, Word, find_terms, prepare, read_words
from stage1_extract.pseudo import STOPWORDS, choose, excluded_words, pseudo_candidates, pseudo_spans
from tests.test_prepare import textgrid


def words_of(text, step=0.4, gaps=()):
    """Words `step` s long, back to back, with a 0.3 s pause before the word indices in `gaps`."""
    out, t = [], 0.0
    for i, w in enumerate(text.split()):
        if i in gaps:
            t += 0.3
        out.append(Word(t, t + step, w))
        t += step
    return out


def texts(spans):
    return [s.text for s in spans]


def test_stopwords_short_words_terms_and_glossary_words_are_never_candidates():
    words = words_of("The quarterly report on Kubernetes was big news for machine owners")
    spans = [TermSpan(4, 4, "kubernetes")]
    excluded = {"kubernetes", "machine", "learning"}       # words of glossary forms
    got = texts(pseudo_candidates(words, spans, excluded, max_ngram=2, min_letters=4))
    # "big" (3 letters) is no unigram but starts a bigram with enough letters; "machine owners"
    # shares a glossary word and "on kubernetes" crosses a term: never
    assert got == ["quarterly", "quarterly report", "report", "big news", "news", "owners"]
    got = texts(pseudo_candidates(words, spans, excluded, max_ngram=2, min_letters=3))
    assert "big" in got and not any("machine" in t or "kubernetes" in t for t in got)
    assert pseudo_candidates(words_of("it is what it was"), [], set()) == []
    assert {"the", "and", "about", "because", "uh", "don't"} <= STOPWORDS


def test_ngrams_follow_max_ngram_pauses_and_inner_stopwords():
    words = words_of("state of mind matters today", gaps=(4,))
    assert texts(pseudo_candidates(words, [], set(), max_ngram=1)) == ["state", "mind", "matters", "today"]
    got = texts(pseudo_candidates(words, [], set(), max_ngram=3))
    assert "state of mind" in got and "mind matters" in got
    assert "state of" not in got and "of mind" not in got           # an edge word is a stopword
    assert "matters today" not in got                               # a pause between them
    spans = pseudo_candidates(words, [], set(), max_ngram=3)
    for s in spans:
        assert s.text == normalize(" ".join(w.text for w in words[s.first:s.last + 1]))
    assert texts(pseudo_candidates(words_of("2024 results were Q3-ready"), [], set())) == ["results"]


def test_pseudo_spans_are_a_seeded_length_weighted_order():
    words = words_of("abcd abcdefghijkl")
    a = pseudo_spans(words, [], set(), random.Random(5), max_ngram=1)
    assert a == pseudo_spans(words, [], set(), random.Random(5), max_ngram=1)
    assert sorted(texts(a)) == ["abcd", "abcdefghijkl"] and a[0].priority >= a[1].priority
    assert len(pseudo_spans(words, [], set(), random.Random(5), limit=1)) == 1
    assert "abcd abcdefghijkl" in texts(pseudo_spans(words, [], set(), random.Random(5)))

    def long_first(power):
        return np.mean([pseudo_spans(words, [], set(), random.Random(i), max_ngram=1,
                                     length_power=power)[0].text == "abcdefghijkl" for i in range(3000)])
    assert long_first(1.0) == pytest.approx(12 / 16, abs=0.03)    # weight = letters
    assert long_first(0.0) == pytest.approx(0.5, abs=0.03)        # uniform


def test_choose_caps_each_pseudo_term():
    words = words_of("report report report summary")
    pool = pseudo_spans(words, [], set(), random.Random(0), max_ngram=1)
    assert len(choose(pool, 10)) == 4
    capped = choose(pool, 10, max_per_term=1)
    assert sorted(texts(capped)) == ["report", "summary"]
    assert len(choose(pool, 2)) == 2


# ------------------------------------------------------------------ prepare with pseudo-terms

GLOSSARY = {"kubernetes": {"term": "Kubernetes"}, "machine learning": {"term": "Machine Learning"},
            "paracetamol": {"term": "Paracetamol"}, "new york": {"term": "New York"}}
ALT = {"acetaminophen": "paracetamol", "big apple": "new york"}
# train speaks every word of the dev/test terms on its own ("machine", "learning", "apple"), plus
# plenty of ordinary words; dev and test speak their terms
TRAIN = ["yesterday kubernetes clusters crashed during the quarterly review",
         "our machine room needs better cooling before summer",
         "learning spanish takes patience and practice every evening",
         "the big apple skyline looked wonderful tonight honestly",
         "visitors compared acetaminophen prices across several pharmacies downtown",
         "engineers celebrated another successful deployment yesterday afternoon"]
DEV = ["doctors prescribe paracetamol after surgery sometimes"]
TEST = ["machine learning conferences attract researchers worldwide",
        "tourists visit new york every december"]


@pytest.fixture
def corpus(tmp_path):
    sr = 16000
    segs = [(f"tr{i}", "spkA", t) for i, t in enumerate(TRAIN)] + \
           [(f"dv{i}", "spkB", t) for i, t in enumerate(DEV)] + [(f"te{i}", "spkC", t) for i, t in enumerate(TEST)]
    (tmp_path / "ali").mkdir()
    rows, offset = [], 0
    for sid, spk, text in segs:
        ws = text.split()
        dur = 0.5 * len(ws) + 0.4
        items = [(round(0.2 + 0.5 * i, 3), round(0.2 + 0.5 * i + 0.45, 3), w) for i, w in enumerate(ws)]
        (tmp_path / "ali" / f"{sid}.TextGrid").write_text(textgrid(items, dur))
        n = int(dur * sr)
        rows.append(f"{sid}\tlong.wav:{offset}:{n}\t{n}\t{spk}\t{text}\ten")
        offset += n
    wav = (0.1 * np.random.default_rng(0).standard_normal(offset + sr)).astype(np.float32)
    sf.write(tmp_path / "long.wav", wav, sr, subtype="PCM_16")
    (tmp_path / "segments.tsv").write_text("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\n" + "\n".join(rows) + "\n")
    (tmp_path / "glossary.json").write_text(json.dumps(GLOSSARY))
    (tmp_path / "alt2main.json").write_text(json.dumps(ALT))
    return tmp_path


def run(corpus, out, **kw):
    args = dict(alt2main=corpus / "alt2main.json", split_by="speaker", dev_speakers=["spkB"],
                test_speakers=["spkC"], context=0.3, noterm_ratio=0.5, noterm_min=1.0, noterm_max=1.5,
                log=lambda *_: None)
    args.update(kw)
    return prepare(corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", corpus / out, **args)


def test_prepare_cuts_pseudo_chunks_in_train_only_and_never_from_glossary_words(corpus):
    off = run(corpus, "off")
    on = run(corpus, "on", pseudo_ratio=5.0)
    gloss = load_glossary(corpus / "glossary.json", corpus / "alt2main.json", log=lambda *_: None)
    # dev/test untouched; train = the same term and no-term chunks, then the pseudo chunks
    for split in ("dev", "test"):
        assert (corpus / "on" / f"{split}.jsonl").read_bytes() == (corpus / "off" / f"{split}.jsonl").read_bytes()
        assert on["splits"][split]["pseudo_chunks"] == 0
    before = (corpus / "off" / "train.jsonl").read_text()
    assert (corpus / "on" / "train.jsonl").read_text().startswith(before) and "pseudo_terms" not in before
    train = read_chunks(corpus / "on" / "train.jsonl", gloss)      # the manifest's own guard passes too
    pseudo = [c for c in train if c.pseudo_terms]
    n_terms = sum(1 for c in train if c.terms)
    assert len(pseudo) == on["splits"]["train"]["pseudo_chunks"] == min(5 * n_terms, on["pseudo_candidates"])
    assert len(pseudo) >= 10
    assert off["splits"]["train"]["term_chunks"] == on["splits"]["train"]["term_chunks"] == n_terms

    # no leak: no pseudo-term is, or holds a word of, any glossary form of any split (aliases too)
    forbidden = {"kubernetes", "machine", "learning", "paracetamol", "acetaminophen", "new", "york", "big", "apple"}
    assert forbidden | {"machinelearning", "newyork", "bigapple"} == set(excluded_words(gloss))
    for c in pseudo:
        (p,) = c.pseudo_terms
        assert not set(p.split()) & forbidden and gloss.canonical(p) is None
        assert c.terms == [] and not c.is_no_term_chunk and c.split == "train" and c.id.startswith(c.segment_id + "_p")

    # the chunk is cut like a term chunk: the words +- 0.3 s, clipped to the segment, in the segment's audio
    segs = {ln.split("\t")[0]: ln.split("\t") for ln in (corpus / "segments.tsv").read_text().splitlines()[1:]}
    for c in pseudo:
        words = read_words(corpus / "ali" / f"{c.segment_id}.TextGrid")
        hit = [i for i in range(len(words)) for j in range(i, len(words))
               if normalize(" ".join(w.text for w in words[i:j + 1])) == c.pseudo_terms[0]
               and words[i].start == pytest.approx(c.term_start_time) and words[j].end == pytest.approx(c.term_end_time)]
        assert hit, c
        assert c.extended_start_time == pytest.approx(max(0.0, c.term_start_time - 0.3))
        assert c.extended_end_time == pytest.approx(min(0.5 * len(words) + 0.4, c.term_end_time + 0.3))
        seg_start = int(segs[c.segment_id][1].split(":")[1]) / 16000
        assert c.audio_offset == pytest.approx(seg_start + c.extended_start_time, abs=1e-4)
        assert c.audio_duration == pytest.approx(c.extended_end_time - c.extended_start_time, abs=1e-4)
        assert c.pseudo_terms[0] in normalize(c.term_chunk_text)
        # term_free (default): no glossary term's words inside the chunk
        assert not find_terms(words_of(c.term_chunk_text), gloss.surface_forms())

    # determinism: same seed, same bytes; another seed, another sample
    run(corpus, "again", pseudo_ratio=5.0)
    assert (corpus / "again" / "train.jsonl").read_bytes() == (corpus / "on" / "train.jsonl").read_bytes()
    run(corpus, "seed", pseudo_ratio=1.0, seed=1)
    run(corpus, "seed0", pseudo_ratio=1.0, seed=0)
    ids = lambda d: [c.id for c in read_chunks(corpus / d / "train.jsonl") if c.pseudo_terms]
    assert ids("seed") != ids("seed0") and len(ids("seed")) == len(ids("seed0")) == n_terms


def test_prepare_pseudo_options(corpus):
    wide = run(corpus, "wide", pseudo_ratio=100.0, pseudo_term_free=False, pseudo_max_per_term=0)
    strict = run(corpus, "strict", pseudo_ratio=100.0)
    assert wide["pseudo_candidates"] > strict["pseudo_candidates"]
    assert wide["splits"]["train"]["pseudo_chunks"] == wide["pseudo_candidates"]   # no cap: all of them
    capped = run(corpus, "capped", pseudo_ratio=100.0, pseudo_term_free=False, pseudo_max_per_term=1)
    assert capped["splits"]["train"]["pseudo_chunks"] == capped["splits"]["train"]["distinct_pseudo_terms"]
    uni = run(corpus, "uni", pseudo_ratio=100.0, pseudo_max_ngram=1, pseudo_term_free=False)
    assert all(" " not in c.pseudo_terms[0] for c in read_chunks(corpus / "uni" / "train.jsonl") if c.pseudo_terms)
    # an extra term list keeps its words out too (e.g. another corpus's glossary)
    (corpus / "other.txt").write_text("Quarterly Review\n")
    ex = run(corpus, "ex", pseudo_ratio=100.0, pseudo_term_free=False, pseudo_exclude=[corpus / "other.txt"])
    got = {c.pseudo_terms[0] for c in read_chunks(corpus / "ex" / "train.jsonl") if c.pseudo_terms}
    assert got and not any({"quarterly", "review"} & set(p.split()) for p in got)
    assert ex["pseudo_candidates"] < wide["pseudo_candidates"]
    with pytest.raises(BadInput, match="pseudo settings"):
        run(corpus, "bad", pseudo_ratio=-1.0)


def test_prepare_cli_reads_the_pseudo_keys(corpus):
    from click.testing import CliRunner
    from stage1_extract.prepare import prepare_command
    r = CliRunner().invoke(prepare_command, [
        "--segments", str(corpus / "segments.tsv"), "--alignments", str(corpus / "ali"),
        "--glossary", str(corpus / "glossary.json"), "--alt2main", str(corpus / "alt2main.json"),
        "--out", str(corpus / "cli"), "--split-by", "speaker", "--dev-speakers", "spkB", "--test-speakers", "spkC",
        "--set", "data.pseudo_ratio=2.0", "--set", "data.pseudo_max_ngram=1"])
    assert r.exit_code == 0, r.output
    assert "pseudo_chunks=" in r.output
    pseudo = [c for c in read_chunks(corpus / "cli" / "train.jsonl") if c.pseudo_terms]
    assert pseudo and all(" " not in c.pseudo_terms[0] for c in pseudo)


# ------------------------------------------------------------------ the manifest field

def chunk(**kw):
    d = dict(id="c1", audio="/a.wav", audio_offset=1.0, audio_duration=2.0, term_chunk_text="a quarterly report",
             term_chunk_audio_ground_truth_terms=[], split="train")
    d.update(kw)
    return Chunk(**d)


def test_manifest_round_trip_and_old_records_unchanged(tmp_path):
    old = chunk(id="t1", term_chunk_audio_ground_truth_terms=["kubernetes"])
    line = old.to_json()
    assert "pseudo_terms" not in line and list(json.loads(line))[-1] == "split"   # exactly the old record
    p = chunk(pseudo_terms=["quarterly report"], extra={"note": 1})
    assert json.loads(p.to_json())["pseudo_terms"] == ["quarterly report"]
    write_chunks([old, p], tmp_path / "m.jsonl")
    a, b = read_chunks(tmp_path / "m.jsonl")
    assert a == old and b == p and b.extra == {"note": 1} and not b.is_no_term_chunk
    write_chunks([a, b], tmp_path / "m2.jsonl")
    assert (tmp_path / "m2.jsonl").read_bytes() == (tmp_path / "m.jsonl").read_bytes()
    # written forms are normalised on reading (one spelling per pseudo-term)
    (tmp_path / "n.jsonl").write_text(chunk(pseudo_terms=["Quarterly  Report!", "quarterly report"]).to_json() + "\n")
    assert read_chunks(tmp_path / "n.jsonl")[0].pseudo_terms == ["quarterly report"]


@pytest.mark.parametrize("record, message", [
    (dict(pseudo_terms=["report"], term_chunk_audio_ground_truth_terms=["kubernetes"]), "also a term chunk"),
    (dict(pseudo_terms=["report"], is_no_term_chunk=True), "also a no-term chunk"),
    (dict(pseudo_terms="report"), 'give a list of strings: \\["report"\\] for one'),
    (dict(pseudo_terms=["report", " "]), "pseudo_terms.*give non-empty strings"),
    (dict(pseudo_terms=[3]), "pseudo_terms.*give a list of strings"),
    (dict(pseudo_terms=[]), "has no terms and is not marked"),
    (dict(pseudo_terms=["Kubernetes"]), "is a glossary term"),
])
def test_manifest_rejects_bad_pseudo_records(tmp_path, record, message):
    (tmp_path / "g.json").write_text(json.dumps(["kubernetes"]))
    gloss = load_glossary(tmp_path / "g.json", log=lambda *_: None)
    d = json.loads(chunk().to_json())
    d.update(record)
    (tmp_path / "m.jsonl").write_text(json.dumps(d) + "\n")
    with pytest.raises(BadInput, match=message) as e:
        read_chunks(tmp_path / "m.jsonl", gloss)
    assert "m.jsonl" in str(e.value)


# ------------------------------------------------------------------ extract and stage 2's view

def test_extract_caches_pseudo_table_and_forms(tmp_path):
    from shared.termside import term_tables
    from stage1_extract.extract import extract
    from stage2_train.data import SplitData
    from tests.test_extract import FakeBackbone
    wav = (0.1 * np.random.default_rng(0).standard_normal(16000 * 20)).astype(np.float32)
    sf.write(tmp_path / "long.wav", wav, 16000, subtype="PCM_16")
    (tmp_path / "glossary.json").write_text(json.dumps(["alpha", "beta"]))
    a = str(tmp_path / "long.wav")
    train = [chunk(id="t0", audio=a, term_chunk_text="say alpha", term_chunk_audio_ground_truth_terms=["alpha"]),
             chunk(id="n0", audio=a, term_chunk_text="nothing here", is_no_term_chunk=True),
             chunk(id="p0", audio=a, term_chunk_text="the quarterly report", pseudo_terms=["quarterly report"]),
             chunk(id="p1", audio=a, term_chunk_text="our summary", pseudo_terms=["summary"]),
             chunk(id="p2", audio=a, term_chunk_text="summary again", pseudo_terms=["summary"])]
    test = [chunk(id="x0", audio=a, term_chunk_text="say beta", term_chunk_audio_ground_truth_terms=["beta"],
                  split="test")]
    write_chunks(train, tmp_path / "chunks/train.jsonl")
    write_chunks(test, tmp_path / "chunks/test.jsonl")
    cfg = load_config(None, [f"data.glossary={tmp_path / 'glossary.json'}", "data.alt2main=",
                             f"data.chunks={tmp_path / 'chunks'}", f"cache.root={tmp_path / 'cache'}",
                             "text.g2p=none"])
    bb = FakeBackbone()
    extract(cfg, backbone=bb, log=lambda *_: None)
    cache = FeatureCache(tmp_path / "cache/features/demo")
    assert cache.read_json("pseudo.json") == ["quarterly report", "summary"]
    table = cache.table("text/pseudo")
    assert len(table) == 2
    for i, t in enumerate(["quarterly report", "summary"]):     # embedded like a glossary item
        np.testing.assert_allclose(table.item(i), bb.text_features([t])[0], atol=2e-2)
    forms = json.loads((cache.root / "forms.json").read_text())
    assert forms["pseudo"]["spell"] == ["quarterly report", "summary"]
    tt = term_tables(cache, {"text_encoders": ["chars"]}, ("pseudo",))["pseudo"]
    assert len(tt) == 2 and tt.grams is not None
    d = SplitData(cache, "train")
    order = {cid: n for n, cid in enumerate(d.ids)}
    assert d.pseudo[order["p0"]] == ["quarterly report"] and d.pseudo[order["t0"]] == []
    assert [bool(d.noterm[order[c]]) for c in ("t0", "n0", "p0", "p1")] == [False, True, False, False]
    # a cache without pseudo chunks has no pseudo table, file or forms group
    write_chunks(train[:2], tmp_path / "chunks2/train.jsonl")
    write_chunks(test, tmp_path / "chunks2/test.jsonl")
    cfg.data.chunks, cfg.cache.name = str(tmp_path / "chunks2"), "plain"
    extract(cfg, backbone=bb, log=lambda *_: None)
    plain = FeatureCache(tmp_path / "cache/features/plain")
    assert "text/pseudo" not in plain.tables and not (plain.root / "pseudo.json").exists()
    assert "pseudo" not in json.loads((plain.root / "forms.json").read_text())


def test_spelling_variants_of_glossary_terms_are_excluded(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps(["PlayStation", "Coca-Cola", "machine learning"]))
    ex = excluded_words(load_glossary(tmp_path / "g.json", log=lambda *_: None))
    assert {"playstation", "coca-cola", "coca", "cola", "cocacola", "machine", "learning", "machinelearning"} <= ex
    words = words_of("Sony sells play station consoles and coca drinks beside machinelearning books")
    got = texts(pseudo_candidates(words, [], ex, max_ngram=2))
    assert "play station" not in got and "coca" not in got and "machinelearning" not in got
    assert {"play", "station", "consoles", "station consoles", "drinks", "books"} <= set(got)
