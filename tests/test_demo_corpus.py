"""The offline demo corpus: eSpeak word times checked against the audio's energy, the output
formats, determinism, speaker-disjoint splits, unseen terms and carriers of each split's own."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from praatio import textgrid

from demo import corpus as dc
from demo.glossary import alt2main, glossary_dict, lexicon, load_demo_terms
from demo.text import (CARRIERS, FILLERS, SPLITS, Carriers, SegmentText, compose, holds_exactly,
                       term_ngrams, word_label)
from demo.tts import SAMPLE_RATE, Synth, english_voices, word_times

SILENCES = {"", "sil", "sp", "<eps>"}


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


# ---------------------------------------------------------------- eSpeak wrapper

@pytest.fixture(scope="module")
def synth():
    return Synth()


@pytest.mark.parametrize("voice,variant", [("en-us", None), ("en-gb-scotland", "f3"),
                                           ("en", "klatt3")])
def test_term_interval_holds_the_speech(synth, voice, variant):
    text = "Well, the patient took paracetamol, and then she slept in Chicago."
    audio, words = synth.say(text, voice=voice, variant=variant, rate=170)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert [w.lower() for w, _, _ in words] == [word_label(t) for t in text.split()]
    times = {w.lower(): (a, b) for w, a, b in words}
    sr = SAMPLE_RATE

    def span(a, b):
        return audio[int(a * sr):int(b * sr)]

    # the comma pause after "Well," lies between two word intervals and is quiet
    pause = span(times["well"][1], times["the"][0])
    assert len(pause) > 0.05 * sr
    floor = max(rms(pause), 1e-4)
    start, end = times["paracetamol"]
    assert rms(span(start, end)) > 30 * floor
    # the speech reaches the end of the interval (its last 60 ms are louder than the pause,
    # which holds the echo tail of variants like f3) ...
    tail = rms(span(end - 0.06, end))
    assert tail > 2 * floor
    # ... and the comma pause up to the next word is quiet: nothing of the term is left outside
    after = span(end, times["and"][0])
    assert len(after) >= 0.02 * sr and rms(after) < min(3 * floor, tail / 2)
    # words are ordered and inside the audio
    flat = [t for _, a, b in words for t in (a, b)]
    assert flat == sorted(flat) and flat[-1] <= len(audio) / sr + 1e-6


def test_unknown_variant_is_refused(synth):
    with pytest.raises(ValueError, match="variant"):
        synth.say("hello", variant="no-such-variant")
    assert "en-us" in english_voices()[0] and "f3" in english_voices()[1]


def test_word_times_splits_shared_event_and_trims_trailing_silence():
    sr = 1000
    audio = np.zeros(1000, np.float32)
    audio[0:200] = 0.5          # "hello"
    audio[400:700] = 0.5        # "for the" (one event) then a pause
    audio[900:1000] = 0.5       # "cat"
    tokens = [(0, 6, "hello,"), (7, 10, "for"), (11, 14, "the"), (15, 18, "cat")]
    events = [(0, 0), (7, 400), (15, 900)]      # event samples at the same 1 kHz rate
    words = word_times(tokens, events, audio, sr, sr)
    assert [w for w, _, _ in words] == ["hello", "for", "the", "cat"]
    assert words[0][1] == 0.0 and abs(words[0][2] - 0.21) < 0.011   # trimmed, not 0.4
    # "for" and "the" share 0.4-0.7 by length; the pause 0.7-0.9 belongs to no word
    assert abs(words[1][1] - 0.4) < 1e-6 and abs(words[2][2] - 0.71) < 0.011
    assert abs(words[1][2] - words[2][1]) < 1e-6
    assert words[3][1] == 0.9 and abs(words[3][2] - 1.0) < 1e-6


# ---------------------------------------------------------------- glossary and text

@pytest.fixture(scope="module")
def terms():
    return load_demo_terms()


def test_glossary_size_and_formats(terms):
    assert len(terms) >= 650
    with_aliases = [t for t in terms if t.aliases]
    assert 35 <= len(with_aliases) <= 60
    g = glossary_dict(terms)
    assert set(g["nintendo"]) == {"term", "short_description", "target_translations", "url"}
    assert g["nintendo"]["term"] == "Nintendo"
    a2m = alt2main(terms)
    assert a2m["acetaminophen"] == "paracetamol" and a2m["big apple"] == "new york city"
    assert all(main in g and alias not in g for alias, main in a2m.items())
    assert all(1 <= len(t.term.split()) <= 4 for t in terms)


def test_templates_hold_no_terms(terms):
    lex = lexicon(terms)
    for template in [t for c in CARRIERS.values() for t in c.all()] + list(FILLERS):
        filled = template.replace("{T}", "qqq").replace("{U}", "qqq")
        labels = [word_label(w) for w in filled.split()]
        assert term_ngrams(labels, lex) == [], template
    for c in CARRIERS.values():
        assert all(t.count("{T}") == 1 and "{U}" not in t for t in c.one_term)
        assert all(t.count("{T}") == t.count("{U}") == 1 for t in c.two_term)
        assert not any("{" in t for t in c.no_term + c.openers + c.closers)


def normal(template: str) -> str:
    """A template up to case, punctuation and which slot is which."""
    return " ".join(word_label(w) for w in re.sub(r"\{[TU]\}", " slot ", template).split())


def test_splits_share_no_template():
    """The real partition: no carrier, opener, closer or no-term sentence in two splits (up to
    case and punctuation), train has most of them, every evaluated split enough of its own."""
    assert set(CARRIERS) == set(SPLITS) == {"train", "dev", "test", "heldout"}
    owner: dict[str, str] = {}
    for split, c in CARRIERS.items():
        for t in c.all():
            assert owner.setdefault(normal(t), split) == split, (t, owner[normal(t)], split)
        assert len(set(map(normal, c.all()))) == len(c.all()), f"{split} repeats a template"
    for split in ("dev", "test", "heldout"):
        c = CARRIERS[split]
        assert len(c.one_term) >= 10 and len(c.two_term) >= 5 and len(c.no_term) >= 8
        assert len(c.openers) >= 3 and len(c.closers) >= 3
        for field in ("one_term", "two_term", "no_term", "openers", "closers"):
            assert len(getattr(CARRIERS["train"], field)) > 1.5 * len(getattr(c, field))
        # a term first, in the middle and last, as in train
        assert any(t.startswith("{T}") for t in c.one_term)
        assert any(re.search(r"\{T\}[.?]$", t) for t in c.one_term)


_FILLER_WORDS = [[word_label(w) for w in f.split()] for f in FILLERS]


def _strip_fillers(labels: list[str]) -> list[str]:
    """The words without fillers, until none is left ("you um know" -> "you know" -> "")."""
    while True:
        out, i = [], 0
        while i < len(labels):
            hit = next((f for f in _FILLER_WORDS if labels[i:i + len(f)] == f), None)
            if hit:
                i += len(hit)
            else:
                out.append(labels[i])
                i += 1
        if out == labels:
            return out
        labels = out


def made_of(text: str, carriers: Carriers) -> bool:
    """Whether `text` is a sequence of `carriers`' sentences (slots filled with anything, fillers
    anywhere): what compose builds from one split's carriers and no other's."""
    def pattern(template: str) -> str:
        words = re.sub(r"\{[TU]\}", " \x00 ", template).split()
        parts = _strip_fillers([w if w == "\x00" else word_label(w) for w in words
                                if w == "\x00" or word_label(w)])
        return " ".join(r"\S+(?: \S+)*?" if p == "\x00" else re.escape(p) for p in parts)
    sentence = "(?:" + "|".join(pattern(t) for t in carriers.all()) + ")"
    labels = _strip_fillers([word_label(w) for w in text.split() if word_label(w)])
    return re.fullmatch(f"{sentence}(?: {sentence})*", " ".join(labels)) is not None


def test_made_of_tells_the_splits_apart(terms):
    lex = lexicon(terms)
    rng = np.random.default_rng(5)
    for split in ("train", "test", "heldout"):
        for n in (0, 1, 2):
            seg = compose(rng, [("ibuprofen", "ibuprofen"), ("Big Apple", "new york city")][:n], 170,
                          (3, 10), CARRIERS[split])
            assert holds_exactly(seg, lex)
            assert made_of(seg.text, CARRIERS[split]), seg.text
            assert set(seg.templates) <= set(CARRIERS[split].all())
            others = [s for s in SPLITS if s != split]
            assert not any(made_of(seg.text, CARRIERS[o]) for o in others), (split, seg.text)


def test_holds_exactly_handles_nesting_and_aliases(terms):
    lex = lexicon(terms)
    labels = ("we", "saw", "the", "apple", "watch", "in", "the", "big", "apple")
    ok = SegmentText("", labels, ((3, 5, "apple watch"), (7, 9, "new york city")))
    assert holds_exactly(ok, lex)   # "apple" nested twice; "big apple" is an alias
    nested_only = SegmentText("", labels, ((3, 4, "apple"), (7, 9, "new york city")))
    assert not holds_exactly(nested_only, lex)
    assert not holds_exactly(SegmentText("", labels, ((3, 5, "apple watch"),)), lex)


def test_compose_builds_planned_spans(terms):
    lex = lexicon(terms)
    rng = np.random.default_rng(0)
    for _ in range(50):
        seg = compose(rng, [("Big Apple", "new york city"), ("ibuprofen", "ibuprofen")], 170,
                      (3, 10), CARRIERS["train"])
        assert len(seg.labels) == len(seg.text.split())
        assert [key for *_, key in seg.spans] == ["new york city", "ibuprofen"]
        assert [" ".join(seg.labels[a:b]) for a, b, _ in seg.spans] == ["big apple", "ibuprofen"]


def test_plan_terms_full_scale_unseen_share(terms):
    occ = dc.plan_terms(terms, dc.split_targets(1.0), np.random.default_rng([0, 1]))
    assert {s: len(v) for s, v in occ.items()} == dc.TARGET_OCCURRENCES
    assert dc.TARGET_OCCURRENCES["train"] >= 3300 and dc.TARGET_OCCURRENCES["test"] >= 1100
    train = {k for _, k in occ["train"]}
    for split in ("dev", "test"):
        keys = {k for _, k in occ[split]}
        assert 0.25 <= len(keys - train) / len(keys) <= 0.35
    spoken = {k for v in occ.values() for _, k in v}
    assert len(spoken) < len(terms)                     # some glossary terms are distractors
    assert any(spoken_form.lower() != key for v in occ.values() for spoken_form, key in v)


# ---------------------------------------------------------------- a small corpus end to end

SCALE = 0.03


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "corpus"
    summary = dc.build_demo_corpus(out, seed=0, scale=SCALE, verbose=False)
    return out, summary


def read_segments(out: Path) -> list[dict]:
    with open(out / "segments.tsv", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        assert header == ["id", "audio", "n_frames", "speaker", "src_text", "src_lang"]
        return [dict(zip(header, row)) for row in reader]


def segment_audio(out: Path, row: dict, cache: dict) -> np.ndarray:
    path, offset, num = row["audio"].rsplit(":", 2)
    if path not in cache:
        audio, sr = sf.read(out / path, dtype="float32")
        assert sr == SAMPLE_RATE and audio.ndim == 1
        cache[path] = audio
    offset, num = int(offset), int(num)
    assert offset + num <= len(cache[path])
    return cache[path][offset:offset + num]


def match_terms(labels: list[str], lex: dict[str, str]) -> list[str]:
    """Leftmost-longest n-gram matching, as prepare does it."""
    out, i = [], 0
    while i < len(labels):
        for n in range(min(5, len(labels) - i), 0, -1):
            key = lex.get(" ".join(labels[i:i + n]))
            if key:
                out.append(key)
                i += n
                break
        else:
            i += 1
    return out


def test_corpus_files_parse(corpus):
    out, summary = corpus
    rows = read_segments(out)
    assert len(rows) == sum(s["segments"] for s in summary["splits"].values())
    glossary = json.loads((out / "glossary.json").read_text())
    assert len(glossary) >= 650 and all(k == v["term"].lower() for k, v in glossary.items())
    a2m = json.loads((out / "alt2main.json").read_text())
    assert all(v in glossary for v in a2m.values())
    cache: dict = {}
    for row in rows:
        audio = segment_audio(out, row, cache)
        assert int(row["n_frames"]) == len(audio) and row["src_lang"] == "en"
        seconds = len(audio) / SAMPLE_RATE
        assert 3.0 <= seconds <= 10.0
        tier = textgrid.openTextgrid(str(out / "alignments" / f"{row['id']}.TextGrid"),
                                     includeEmptyIntervals=True).getTier("words")
        assert abs(tier.maxTimestamp - seconds) < 1e-6
        words = [e.label for e in tier.entries if e.label not in SILENCES]
        assert words == [word_label(w) for w in row["src_text"].split()]
        assert tier.entries[0].label in SILENCES and tier.entries[-1].label in SILENCES


def test_corpus_energy_matches_textgrids(corpus):
    out, _ = corpus
    lex = {**{k: k for k in json.loads((out / "glossary.json").read_text())},
           **json.loads((out / "alt2main.json").read_text())}
    cache: dict = {}
    n_terms = 0
    for row in read_segments(out):
        audio = segment_audio(out, row, cache)
        entries = textgrid.openTextgrid(str(out / "alignments" / f"{row['id']}.TextGrid"),
                                        includeEmptyIntervals=True).getTier("words").entries
        sr = SAMPLE_RATE
        lead = audio[:int(entries[0].end * sr)]
        floor = max(rms(lead), 1e-4)
        assert rms(lead) < 0.01            # the silence before the first word is quiet
        words = [e for e in entries if e.label not in SILENCES]
        labels = [e.label for e in words]
        # every term the matcher finds is loud inside its interval
        i = 0
        while i < len(labels):
            for n in range(min(5, len(labels) - i), 0, -1):
                if " ".join(labels[i:i + n]) in lex:
                    start, end = words[i].start, words[i + n - 1].end
                    assert rms(audio[int(start * sr):int(end * sr)]) > 10 * floor, row["id"]
                    n_terms += 1
                    i += n
                    break
            else:
                i += 1
        for e in entries:
            if e.label == "sil":
                assert rms(audio[int(e.start * sr):int(e.end * sr)]) < 0.01, (row["id"], e)
    assert n_terms > 100


def test_corpus_splits_speakers_and_unseen_terms(corpus):
    out, summary = corpus
    splits = json.loads((out / "splits.json").read_text())
    dev, test = set(splits["dev_speakers"]), set(splits["test_speakers"])
    assert dev and test and not dev & test
    lex = {**{k: k for k in json.loads((out / "glossary.json").read_text())},
           **json.loads((out / "alt2main.json").read_text())}
    speakers, terms = {"train": set(), "dev": set(), "test": set()}, {"train": set(), "dev": set(),
                                                                        "test": set()}
    for row in read_segments(out):
        split = "dev" if row["speaker"] in dev else "test" if row["speaker"] in test else "train"
        speakers[split].add(row["speaker"])
        terms[split].update(match_terms([word_label(w) for w in row["src_text"].split()], lex))
    assert not speakers["train"] & (dev | test)
    for split in ("dev", "test"):
        unseen = len(terms[split] - terms["train"]) / len(terms[split])
        assert unseen >= 0.2
        assert summary["splits"][split]["distinct_terms"] == len(terms[split])
    assert summary["splits"]["test"]["no_term_segments"] > 0


def test_corpus_sentences_come_from_their_splits_carriers(corpus):
    out, summary = corpus
    splits = json.loads((out / "splits.json").read_text())
    split_of = {**{s: "dev" for s in splits["dev_speakers"]}, **{s: "test" for s in splits["test_speakers"]}}
    seen = {s: 0 for s in ("train", "dev", "test")}
    for row in read_segments(out):
        split = split_of.get(row["speaker"], "train")
        assert made_of(row["src_text"], CARRIERS[split]), (split, row["src_text"])
        assert not any(made_of(row["src_text"], CARRIERS[o]) for o in SPLITS if o != split), row["src_text"]
        seen[split] += 1
    assert min(seen.values()) > 0
    for split in seen:
        assert 0 < summary["splits"][split]["templates_used"] <= len(CARRIERS[split].all())


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_reuse(corpus, tmp_path):
    out, summary = corpus
    again = dc.build_demo_corpus(tmp_path / "again", seed=0, scale=SCALE, workers=1, verbose=False)
    assert digest(out) == digest(tmp_path / "again")
    assert again["splits"] == summary["splits"]
    t0 = time.perf_counter()
    reused = dc.build_demo_corpus(out, seed=0, scale=SCALE, verbose=False)
    assert reused["reused"] and time.perf_counter() - t0 < 2.0
    assert reused["splits"] == summary["splits"]


def test_cli_help_and_reuse(corpus):
    out, _ = corpus
    runner = CliRunner()
    result = runner.invoke(dc.demo_corpus_command, ["--help"])
    assert result.exit_code == 0 and "--scale" in result.output and "--seed" in result.output
    result = runner.invoke(dc.demo_corpus_command, ["--out", str(out), "--scale", str(SCALE)])
    assert result.exit_code == 0, result.output
    assert "reusing" in result.output
