"""prepare on hand-written TextGrids: n-gram matching, aliases, overlaps, edges, silences, offsets."""
import json

import numpy as np
import pytest
import soundfile as sf

from shared.errors import BadInput
from shared.manifest import read_chunks
from stage1_extract.prepare import find_terms, prepare, read_words, Word


def textgrid(words, xmax, tier="words"):
    """A Praat long-format TextGrid written by hand; words = [(start, end, label)], gaps are silence."""
    ivs, t = [], 0.0
    for s, e, w in words:
        if s > t:
            ivs.append((t, s, ""))
        ivs.append((s, e, w))
        t = e
    if t < xmax:
        ivs.append((t, xmax, ""))
    body = "\n".join(f'        intervals [{i}]:\n            xmin = {s}\n            xmax = {e}\n            text = "{w}"'
                     for i, (s, e, w) in enumerate(ivs, 1))
    return (f'File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin = 0\nxmax = {xmax}\ntiers? <exists>\n'
            f'size = 1\nitem []:\n    item [1]:\n        class = "IntervalTier"\n        name = "{tier}"\n'
            f'        xmin = 0\n        xmax = {xmax}\n        intervals: size = {len(ivs)}\n{body}\n')


GLOSSARY = {"new york": {"term": "New York"}, "new york city hall": {"term": "New York City Hall"},
            "york city": {"term": "York City"}, "paracetamol": {"term": "Paracetamol"},
            "kubernetes": {"term": "Kubernetes"}, "machine learning": {"term": "machine learning"}}


def words_of(text, start=0.0, step=0.5):
    return [Word(start + i * step, start + (i + 1) * step, w) for i, w in enumerate(text.split())]


def test_longest_match_first_no_overlap():
    forms = {"new york": "new york", "new york city hall": "new york city hall", "york city": "york city",
             "kubernetes": "kubernetes", "acetaminophen": "paracetamol"}
    spans = find_terms(words_of("we saw New York City Hall and york city with Acetaminophen kubernetes."), forms)
    assert [(s.first, s.last, s.key) for s in spans] == [
        (2, 5, "new york city hall"), (7, 8, "york city"), (10, 10, "paracetamol"), (11, 11, "kubernetes")]
    # "york city" overlaps the longer match inside "new york city hall" and is not reported there
    assert find_terms(words_of("new york city"), forms)[0].key == "new york"
    assert find_terms(words_of("a b c d e f"), forms, max_ngram=5) == []


@pytest.fixture
def corpus(tmp_path):
    """Two segments inside one long WAV (offset path), a missing TextGrid, silences."""
    sr = 16000
    rng = np.random.default_rng(0)
    long = (0.1 * rng.standard_normal(sr * 30)).astype(np.float32)
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio/long.wav", long, sr, subtype="PCM_16")
    ali = tmp_path / "ali"
    ali.mkdir()
    # s1: 10 s from 5 s into the file; a term at the very start and one at the very end
    s1 = [(0.0, 0.6, "Kubernetes"), (0.6, 0.7, "sil"), (0.7, 1.0, "is"), (1.0, 1.4, "great"),
          (1.5, 1.8, "and"), (1.8, 2.2, "we"), (2.2, 2.6, "like"), (2.6, 2.9, "it"), (3.0, 3.3, "a"),
          (3.3, 3.8, "lot"), (3.8, 4.2, "so"), (4.2, 4.6, "much"), (4.6, 4.9, "<eps>"), (5.0, 5.4, "then"),
          (5.4, 5.8, "visit"), (5.8, 6.1, "sp"), (6.1, 6.5, "new"), (6.5, 6.9, "york"), (6.9, 7.3, "city"),
          (7.3, 7.7, "hall"), (7.7, 8.3, "today"), (8.3, 9.4, "with"), (9.4, 10.0, "acetaminophen")]
    (ali / "s1.TextGrid").write_text(textgrid(s1, 10.0))
    s3 = [(0.2, 0.6, "machine"), (0.6, 1.0, "learning"), (1.0, 1.5, "rocks")]
    (ali / "s3.TextGrid").write_text(textgrid(s3, 2.0))
    segs = tmp_path / "segments.tsv"
    segs.write_text("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\n"
                    f"s1\taudio/long.wav:{5 * sr}:{10 * sr}\t{10 * sr}\tspkA\tx\ten\n"
                    f"s2\taudio/long.wav:{16 * sr}:{2 * sr}\t{2 * sr}\tspkA\tx\ten\n"
                    f"s3\taudio/long.wav:{20 * sr}:{2 * sr}\t{2 * sr}\tspkB\tx\ten\n")
    g = tmp_path / "glossary.json"
    g.write_text(json.dumps(GLOSSARY))
    a = tmp_path / "alt2main.json"
    a.write_text(json.dumps({"acetaminophen": "paracetamol"}))
    return tmp_path


def test_prepare_writes_chunks_into_segment_audio(corpus):
    out = corpus / "chunks"
    with pytest.raises(BadInput, match="TextGrid missing") as e:
        prepare(corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", out,
                alt2main=corpus / "alt2main.json", log=lambda *_: None)
    assert "s2.TextGrid" in str(e.value) and "--skip-bad" in str(e.value)
    summary = prepare(corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", out,
                      alt2main=corpus / "alt2main.json", split_by="speaker", test_speakers=["spkB"],
                      noterm_ratio=1.0, skip_bad=True, log=lambda *_: None)
    assert summary["segments_skipped"] == {"TextGrid missing": 1}
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["segment_id"] for r in rejected] == ["s2"]
    train = read_chunks(out / "train.jsonl")
    terms = [c for c in train if not c.is_no_term_chunk]
    assert [c.terms[0] for c in terms] == ["kubernetes", "new york city hall", "paracetamol"]
    k, nych, para = terms
    # start of segment: context clipped at 0; offset points into the long file (5 s)
    assert k.extended_start_time == 0.0 and k.audio_offset == pytest.approx(5.0)
    assert k.audio_duration == pytest.approx(1.6) and k.term_chunk_text == "Kubernetes is great"
    assert nych.audio_offset == pytest.approx(5.0 + 5.1) and nych.audio_duration == pytest.approx(3.6)
    assert nych.term_chunk_text == "then visit new york city hall today"   # silences dropped
    # end of segment: clipped at the segment's 10 s; alias resolved to its main term
    assert para.extended_end_time == pytest.approx(10.0) and para.term_chunk_text == "with acetaminophen"
    noterm = [c for c in train if c.is_no_term_chunk]
    assert noterm and all(c.terms == [] for c in noterm)
    for c in noterm:  # a no-term chunk never overlaps a term's words
        s, e = c.extended_start_time, c.extended_end_time
        for t in terms:
            assert e <= t.term_start_time + 1e-6 or s >= t.term_end_time - 1e-6
        # by default as long as one of its split's term chunks
        assert c.audio_duration in {t.audio_duration for t in terms}
        assert len(c.term_chunk_text.split()) >= 2
    (test,) = read_chunks(out / "test.jsonl")
    assert test.terms == ["machine learning"] and test.speaker == "spkB" and test.split == "test"


def test_bad_textgrids_and_audio(corpus):
    ali = corpus / "ali"
    (ali / "s2.TextGrid").write_text(textgrid([(0.1, 0.5, "hi")], 2.0, tier="phones"))
    with pytest.raises(BadInput, match="no 'words' tier"):
        prepare(corpus / "segments.tsv", ali, corpus / "glossary.json", corpus / "o", log=lambda *_: None)
    (ali / "s2.TextGrid").write_text(textgrid([(0.1, 0.5, "hi"), (0.4, 0.9, "there")], 2.0))
    with pytest.raises(BadInput, match="overlapping"):
        prepare(corpus / "segments.tsv", ali, corpus / "glossary.json", corpus / "o", log=lambda *_: None)
    (ali / "s2.TextGrid").write_text(textgrid([(0.1, 0.5, "hi"), (0.5, 3.5, "there")], 3.5))
    with pytest.raises(BadInput, match="past the segment's audio"):
        prepare(corpus / "segments.tsv", ali, corpus / "glossary.json", corpus / "o", log=lambda *_: None)
    (ali / "s2.TextGrid").write_text("garbage")
    with pytest.raises(BadInput, match="malformed TextGrid"):
        read_words(ali / "s2.TextGrid")
    segs = corpus / "segments.tsv"
    segs.write_text(segs.read_text().replace(f"{20 * 16000}:{2 * 16000}", f"{29 * 16000}:{3 * 16000}"))
    (ali / "s2.TextGrid").write_text(textgrid([(0.1, 0.5, "hi")], 2.0))
    with pytest.raises(BadInput, match="before the segment end"):
        prepare(segs, ali, corpus / "glossary.json", corpus / "o", log=lambda *_: None)


def test_ratio_split_is_seeded(corpus):
    (corpus / "ali" / "s2.TextGrid").write_text(textgrid([(0.1, 0.5, "kubernetes")], 2.0))
    a = prepare(corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", corpus / "a",
                split_by="ratio", dev_ratio=0.5, test_ratio=0.0, seed=3, log=lambda *_: None)
    b = prepare(corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", corpus / "b",
                split_by="ratio", dev_ratio=0.5, test_ratio=0.0, seed=3, log=lambda *_: None)
    assert a["splits"] == b["splits"]
    for name in a["splits"]:
        assert (corpus / "a" / f"{name}.jsonl").read_text() == (corpus / "b" / f"{name}.jsonl").read_text()


def test_ngram_matches_lists_every_run_in_order():
    from shared.glossary import ngram_matches, word_ngrams
    words = ["deep", "learning", "rate", "deep"]
    forms = {"deep learning": "DL", "learning": "L", "deep": "D", "learning rate schedule": "X"}
    assert ngram_matches(words, forms, 2) == [(0, 1, "D"), (0, 2, "DL"), (1, 2, "L"), (3, 4, "D")]
    assert ngram_matches(words, forms, 1) == [(0, 1, "D"), (1, 2, "L"), (3, 4, "D")]
    assert [g for _, _, g in word_ngrams(["a", "b"], 5)] == ["a", "a b", "b"]


# ---------------------------------------------------------------- no-term chunk lengths

def _term_free_corpus(tmp_path, n_segments=60, seconds=9.0):
    """Segments of ~0.45 s words with one term each: 1-word terms for speaker spkA (train), 3-word
    terms for spkB (dev), so the two splits' term chunks differ in length by ~0.9 s."""
    sr = 16000      # segments' sample offsets are at 16 kHz
    rng = np.random.default_rng(3)
    sf.write(tmp_path / "long.wav", (0.05 * rng.standard_normal(sr * int(n_segments * seconds + 1))
                                     ).astype(np.float32), sr, subtype="PCM_16")
    (tmp_path / "ali").mkdir()
    filler = "we are looking at some more words here and there today".split()
    rows = []
    for i in range(n_segments):
        spk = "spkA" if i % 2 == 0 else "spkB"
        term = ["kubernetes"] if spk == "spkA" else ["new", "york", "city", "hall"][:3]
        words, t = [], 0.2
        at = int(rng.integers(0, 12))
        tokens = [filler[int(k)] for k in rng.integers(0, len(filler), 16)]
        tokens[at:at] = term
        for w in tokens:
            d = float(rng.uniform(0.3, 0.6))
            if t + d > seconds - 0.2:
                break
            words.append((round(t, 3), round(t + d, 3), w))
            t += d
        (tmp_path / "ali" / f"s{i:02d}.TextGrid").write_text(textgrid(words, seconds))
        rows.append(f"s{i:02d}\tlong.wav:{int(i * seconds * sr)}:{int(seconds * sr)}\t{int(seconds * sr)}\t{spk}\tx\ten")
    (tmp_path / "segments.tsv").write_text("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\n" + "\n".join(rows) + "\n")
    (tmp_path / "glossary.json").write_text(json.dumps({"kubernetes": {"term": "Kubernetes"},
                                                        "new york city": {"term": "New York City"}}))
    return tmp_path


def _durations(path):
    chunks = read_chunks(path)
    return (np.array([c.audio_duration for c in chunks if not c.is_no_term_chunk]),
            np.array([c.audio_duration for c in chunks if c.is_no_term_chunk]), chunks)


def test_noterm_chunks_are_as_long_as_their_splits_term_chunks(tmp_path):
    corpus = _term_free_corpus(tmp_path)
    run = dict(split_by="speaker", dev_speakers=["spkB"], context=0.6, noterm_ratio=1.0, log=lambda *_: None)
    summary = prepare(corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", corpus / "match", **run)
    terms = {}
    for split in ("train", "dev"):
        term_s, noterm_s, chunks = _durations(corpus / "match" / f"{split}.jsonl")
        terms[split] = term_s
        assert len(noterm_s) == len(term_s) == 30
        assert "noterm_lengths_given_up" not in summary["splits"][split]
        # the same distribution: every length is a term chunk's, mean and median agree
        assert set(noterm_s) <= set(term_s)
        assert abs(noterm_s.mean() - term_s.mean()) < 0.1, split
        assert abs(np.median(noterm_s) - np.median(term_s)) < 0.15, split
        # placed in term-free stretches with two words at least, never overlapping each other
        by_seg = {}
        for c in chunks:
            by_seg.setdefault(c.segment_id, []).append(c)
        for seg in by_seg.values():
            spans = [(c.term_start_time, c.term_end_time) for c in seg if not c.is_no_term_chunk]
            free = sorted((c.extended_start_time, c.extended_end_time) for c in seg if c.is_no_term_chunk)
            assert all(b <= a2 + 1e-6 for (_, b), (a2, _) in zip(free, free[1:]))
            for a, b in free:
                assert all(b <= s + 1e-6 or a >= e - 1e-6 for s, e in spans)
        assert all(len(c.term_chunk_text.split()) >= 2 for c in chunks if c.is_no_term_chunk)
    # each split matches its own term chunks (dev's 3-word terms make them ~0.9 s longer)
    assert np.median(terms["dev"]) - np.median(terms["train"]) > 0.6
    # the old band is what the default replaced: its chunks are told from term chunks by length
    prepare(corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", corpus / "band",
            noterm_length="band", **run)
    term_s, noterm_s, _ = _durations(corpus / "band" / "train.jsonl")
    assert noterm_s.min() >= 2.5 - 1e-6 and noterm_s.max() <= 4.0 + 1e-6
    assert abs(np.median(noterm_s) - np.median(term_s)) > 0.15
    # seeded: the same again
    prepare(corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", corpus / "again", **run)
    assert (corpus / "again" / "dev.jsonl").read_text() == (corpus / "match" / "dev.jsonl").read_text()


def test_noterm_length_settings_are_checked(tmp_path):
    corpus = _term_free_corpus(tmp_path, n_segments=2)
    args = (corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", corpus / "o")
    with pytest.raises(BadInput, match="noterm_length"):
        prepare(*args, noterm_length="fixed", log=lambda *_: None)
    with pytest.raises(BadInput, match="noterm_min 4.0 and noterm_max 2.5"):
        prepare(*args, noterm_length="band", noterm_min=4.0, noterm_max=2.5, log=lambda *_: None)
    with pytest.raises(BadInput, match="noterm_ratio"):
        prepare(*args, noterm_ratio=-1.0, log=lambda *_: None)
    summary = prepare(*args, noterm_ratio=0.0, log=lambda *_: None)     # 0 = off
    assert summary["splits"]["all"]["noterm_chunks"] == 0 and summary["splits"]["all"]["term_chunks"] == 2
    from shared.config import load_config
    assert load_config(None, ["data.noterm_length=band"]).data.noterm_length == "band"
