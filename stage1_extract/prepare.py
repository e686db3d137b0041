"""`prepare`: segments + MFA TextGrids (or a lhotse CutSet) + glossary -> term-chunk manifests
(README, "Input formats").

Each input becomes the same records, segments with their aligned words (`AlignedSegment`), and one
chunker (`prepare_aligned`) cuts them: the TSV + TextGrid reader is `tsv_segments` here, the lhotse
reader `lhotse_segments` in stage1_extract/lhotse_io.py (imported only when used).

A term chunk is a glossary term's aligned word span widened by `context` seconds each side
(clipped to the segment), pointing into the segment's audio; its ground-truth terms are every
glossary term whose whole span lies inside the chunk. No-term chunks are cut from stretches of
a segment that hold no term, so the model learns to reject; by default each is as long as a term
chunk of its split drawn at random (`noterm_length = "match"`), so a chunk's length says nothing
about whether it holds a term. Pseudo-term chunks (train only,
`pseudo_ratio` > 0) are cut like term chunks around non-glossary words (stage1_extract/pseudo.py).
"""
from __future__ import annotations

import bisect
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
from tqdm import tqdm

from shared.audio import audio_info
from shared.cli import config_options, figures
from shared.config import Config, save_config
from shared.errors import BadInput, RejectLog
from shared.glossary import Glossary, load_glossary, ngram_matches, normalize
from shared.manifest import Chunk, Segment, read_segments, write_chunks
from stage1_extract.pseudo import PseudoSpan, choose, excluded_words, pseudo_spans

SILENCE = {"", "sil", "sp", "spn", "<eps>", "<unk>"}
NOTERM_LENGTHS = ("match", "band")     # data.noterm_length: how long no-term chunks are
# Placements tried per no-term chunk in "match" mode before its drawn length is given up
_NOTERM_TRIES = 200
# Words may end a hair after the audio (rounding in aligners); beyond this they are an error.
_TIME_TOLERANCE = 0.05


@dataclass
class Word:
    start: float
    end: float
    text: str


@dataclass
class TermSpan:
    first: int      # index of the first word
    last: int       # index of the last word (inclusive)
    key: str        # canonical main key

    def start(self, words):
        return words[self.first].start

    def end(self, words):
        return words[self.last].end


def read_words(path: Path) -> list[Word]:
    """The `words` tier of an MFA TextGrid, silences dropped; times checked for order/overlap."""
    from praatio import textgrid
    if not path.is_file():
        raise BadInput("TextGrid missing", file=path, fix="align this segment with MFA or drop it with --skip-bad")
    try:
        tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
    except Exception as e:  # praatio raises many types for malformed files
        if "overlap" in str(e):
            raise BadInput(f"overlapping intervals in tier 'words': {str(e).splitlines()[-1]}", file=path,
                           fix="fix the alignment or drop the segment with --skip-bad") from None
        raise BadInput(f"malformed TextGrid ({type(e).__name__}: {e})", file=path,
                       fix="re-run the aligner or drop the segment with --skip-bad") from None
    names = tg.tierNames
    tier_name = next((n for n in names if n.lower() == "words"), None)
    if tier_name is None:
        raise BadInput(f"TextGrid has no 'words' tier (tiers: {list(names)})", file=path,
                       fix="MFA writes a 'words' tier; rename the word tier to 'words'")
    words = []
    prev_end = 0.0
    for entry in tg.getTier(tier_name).entries:
        start, end, label = float(entry[0]), float(entry[1]), str(entry[2]).strip()
        if start < prev_end - 1e-6:
            raise BadInput(f"overlapping intervals at {start:.3f}s in tier 'words'", file=path,
                           fix="fix the alignment or drop the segment with --skip-bad")
        prev_end = end
        if label.lower() in SILENCE:
            continue
        words.append(Word(start, end, label))
    return words


def find_terms(words: list[Word], forms: dict[str, str], max_ngram: int = 5) -> list[TermSpan]:
    """Glossary terms (or aliases) among the words: n-grams 1..max_ngram, longest first, no overlaps."""
    norm = [normalize(w.text) for w in words]
    candidates = [(j - i, i, main) for i, j, main in ngram_matches(norm, forms, max_ngram)]
    # Longest match wins; among equals the earlier one. Greedy over that order gives no overlaps.
    candidates.sort(key=lambda c: (-c[0], c[1]))
    taken = [False] * len(words)
    spans = []
    for n, i, main in candidates:
        if any(taken[i:i + n]):
            continue
        for j in range(i, i + n):
            taken[j] = True
        spans.append(TermSpan(i, i + n - 1, main))
    spans.sort(key=lambda s: s.first)
    return spans


def _words_inside(words: list[Word], start: float, end: float) -> list[Word]:
    # A word belongs to a window when its middle does: cut words at the edges count once.
    return [w for w in words if start <= (w.start + w.end) / 2 <= end]


def span_chunk(seg: Segment, words: list[Word], first: int, last: int, duration: float, context: float,
               cid: str, terms: list[str], pseudo_terms: list[str] = ()) -> Chunk:
    """The chunk of words[first..last] widened by `context` seconds each side, clipped to the segment:
    how every term chunk and pseudo-term chunk is cut."""
    t0, t1 = words[first].start, words[last].end
    s, e = max(0.0, t0 - context), min(duration, t1 + context)
    return Chunk(
        id=cid, audio=seg.audio, audio_offset=round(seg.start + s, 4), audio_duration=round(e - s, 4),
        term_chunk_text=" ".join(w.text for w in _words_inside(words, s, e)),
        term_chunk_audio_ground_truth_terms=list(terms), is_no_term_chunk=False, segment_id=seg.id,
        term_start_time=round(t0, 4), term_end_time=round(t1, 4),
        extended_start_time=round(s, 4), extended_end_time=round(e, 4), speaker=seg.speaker,
        pseudo_terms=list(pseudo_terms), channel=seg.channel)


def segment_chunks(seg: Segment, words: list[Word], spans: list[TermSpan], duration: float,
                   context: float) -> list[Chunk]:
    """One term chunk per term occurrence."""
    out = []
    for k, span in enumerate(spans):
        c = span_chunk(seg, words, span.first, span.last, duration, context, f"{seg.id}_t{k}", [])
        s, e = c.extended_start_time, c.extended_end_time
        inside = [sp.key for sp in spans if sp.start(words) >= s - 1e-6 and sp.end(words) <= e + 1e-6]
        c.term_chunk_audio_ground_truth_terms = list(dict.fromkeys([span.key] + inside))
        out.append(c)
    return out


def pseudo_chunks(seg: Segment, words: list[Word], spans: list[TermSpan], duration: float, context: float,
                  excluded: frozenset[str], seed: int, max_ngram: int = 2, min_letters: int = 4,
                  length_power: float = 1.0, term_free: bool = True) -> list[tuple[PseudoSpan, Chunk]]:
    """Every pseudo-term candidate of a segment with its chunk (id `<segment>_p<k>`, k = the
    candidate's place in word order), each span carrying its sampling priority. Seeded per segment,
    so adding segments never changes the draws of the others.

    With `term_free`, a candidate whose chunk overlaps any glossary term's words is dropped: that
    term would be audible in a chunk that does not list it, a false negative for the trainer."""
    rng = random.Random(f"{seed}:pseudo:{seg.id}")
    cands = pseudo_spans(words, spans, excluded, rng, max_ngram, min_letters, length_power)
    cands.sort(key=lambda p: (p.first, p.last))
    out = []
    for k, p in enumerate(cands):
        c = span_chunk(seg, words, p.first, p.last, duration, context, f"{seg.id}_p{k}", [], [p.text])
        if term_free and any(sp.start(words) < c.extended_end_time and sp.end(words) > c.extended_start_time
                             for sp in spans):
            continue
        out.append((p, c))
    return out


def _free_intervals(words: list[Word], spans: list[TermSpan], duration: float) -> list[tuple[float, float]]:
    """(start, end) of the stretches of a segment that hold no term's words, in time order."""
    busy = sorted((sp.start(words), sp.end(words)) for sp in spans)
    free, cursor = [], 0.0
    for s, e in busy:
        if s > cursor:
            free.append((cursor, s))
        cursor = max(cursor, e)
    if duration > cursor:
        free.append((cursor, duration))
    return free


def _noterm_chunk(seg: Segment, a: float, length: float, inside: list[Word], k: int) -> Chunk:
    return Chunk(
        id=f"{seg.id}_n{k}", audio=seg.audio, audio_offset=round(seg.start + a, 4),
        audio_duration=round(length, 4), term_chunk_text=" ".join(w.text for w in inside),
        term_chunk_audio_ground_truth_terms=[], is_no_term_chunk=True, segment_id=seg.id,
        extended_start_time=round(a, 4), extended_end_time=round(a + length, 4),
        speaker=seg.speaker, channel=seg.channel)


def noterm_candidates(seg: Segment, words: list[Word], spans: list[TermSpan], duration: float,
                      min_len: float, max_len: float, rng: random.Random) -> list[Chunk]:
    """`noterm_length = "band"`: windows of min_len..max_len seconds that hold no term and at least
    two words."""
    out = []
    for a, b in _free_intervals(words, spans, duration):
        while b - a >= min_len:
            length = min(rng.uniform(min_len, max_len), b - a)
            inside = _words_inside(words, a, a + length)
            if len(inside) >= 2:
                out.append(_noterm_chunk(seg, a, length, inside, len(out)))
            a += length
    return out


@dataclass
class FreeStretch:
    """A stretch of a segment that holds no term's words (times relative to the segment)."""
    seg: Segment
    start: float
    end: float
    words: list[Word]      # the words whose middle lies inside


def free_stretches(seg: Segment, words: list[Word], spans: list[TermSpan], duration: float) -> list[FreeStretch]:
    """The term-free stretches of a segment with at least two words (a no-term chunk needs two)."""
    out = []
    for a, b in _free_intervals(words, spans, duration):
        inside = _words_inside(words, a, b)
        if len(inside) >= 2:
            out.append(FreeStretch(seg, a, b, inside))
    return out


def place_noterm(stretches: list[FreeStretch], lengths: list[float], want: int,
                 rng: random.Random, band: tuple[float, float] | None = None) -> tuple[list[Chunk], int]:
    """`noterm_length = "match"`: `want` no-term chunks, each as long as a length drawn at random
    from `lengths` (the split's term-chunk durations; without any, uniform in `band`), placed at
    random in the term-free stretches.

    A stretch is drawn in proportion to its length (long term-free stretches give more chunks) and
    the start uniformly where the chunk fits; a placement needs two words inside and no overlap
    with another no-term chunk of the same segment. A drawn length that finds no placement in
    _NOTERM_TRIES tries is given up (it would bias the lengths if that happened often, so the
    count comes back: (chunks, lengths given up))."""
    if not stretches or want <= 0 or not (lengths or band):
        return [], 0
    cum = list(itertools.accumulate(st.end - st.start for st in stretches))
    total = cum[-1]
    taken: dict[str, list[tuple[float, float]]] = {}
    out, missed = [], 0
    for _ in range(want):
        length = rng.choice(lengths) if lengths else round(rng.uniform(*band), 4)
        for _ in range(_NOTERM_TRIES):
            st = stretches[min(bisect.bisect_right(cum, rng.random() * total), len(stretches) - 1)]
            room = st.end - st.start - length
            if room < 0:
                continue
            a = st.start + rng.random() * room
            b = a + length
            mine = taken.setdefault(st.seg.id, [])
            if any(a < e and b > s for s, e in mine):
                continue
            inside = _words_inside(st.words, a, b)
            if len(inside) < 2:
                continue
            out.append(_noterm_chunk(st.seg, a, length, inside, len(mine)))
            mine.append((a, b))
            break
        else:
            missed += 1
    return out, missed


def assign_split(seg: Segment, split_by: str, dev_speakers: set, test_speakers: set,
                 dev_ratio: float, test_ratio: float, seed: int) -> str:
    if split_by == "speaker":
        return "test" if seg.speaker in test_speakers else "dev" if seg.speaker in dev_speakers else "train"
    if split_by == "ratio":
        # Seeded per segment id, so adding segments never reshuffles the old ones.
        x = random.Random(f"{seed}:{seg.id}").random()
        return "test" if x < test_ratio else "dev" if x < test_ratio + dev_ratio else "train"
    return ""


@dataclass
class AlignedSegment:
    """A segment with its aligned words (times relative to the segment's start): what every input
    becomes before the one chunker, `prepare_aligned`, cuts it."""
    seg: Segment
    words: list[Word]
    duration: float        # seconds of audio the segment spans


# (segment id, reader) per segment, in input order; a reader raises BadInput for a bad segment,
# which --skip-bad turns into a line of rejected.jsonl.
SegmentSource = list[tuple[str, Callable[[], AlignedSegment]]]


class SegmentAudio:
    """Checks a segment against its audio file and gives its duration; each file is opened once.
    `source` names what the segments came from, for the errors' fix."""

    def __init__(self, source: str = "the segments TSV"):
        self._info: dict[str, tuple[int, int]] = {}
        self.source = source

    def duration(self, seg: Segment) -> float:
        if seg.audio not in self._info:
            self._info[seg.audio] = audio_info(seg.audio, record=f"segment {seg.id}")
        sr, frames = self._info[seg.audio]
        file_len = frames / sr
        if seg.start >= file_len:
            raise BadInput(f"segment {seg.id}: offset {seg.start:.2f}s past the end of the audio "
                           f"({file_len:.2f}s)", file=seg.audio, fix=f"check {self.source}")
        duration = seg.duration if seg.duration is not None else file_len - seg.start
        if seg.start + duration > file_len + _TIME_TOLERANCE:
            raise BadInput(f"segment {seg.id}: audio ends at {file_len:.2f}s, before the segment "
                           f"end {seg.start + duration:.2f}s", file=seg.audio,
                           fix=f"the audio is shorter than the segment; check {self.source}")
        return duration


def check_word_ends(words: list[Word], duration: float, file, record=None) -> None:
    """The last word must end within the segment's audio (give or take the aligners' rounding)."""
    if words and words[-1].end > duration + _TIME_TOLERANCE:
        raise BadInput(f"word {words[-1].text!r} ends at {words[-1].end:.2f}s, past the segment's "
                       f"audio ({duration:.2f}s)", file=file, record=record,
                       fix="the alignment does not fit the audio; re-align or drop with --skip-bad")


def tsv_segments(segments: str | Path, alignments: str | Path, limit: int = 0) -> SegmentSource:
    """The segments TSV with one MFA TextGrid per segment (`<alignments>/<segment id>.TextGrid`)."""
    alignments = Path(alignments)
    segs = read_segments(segments)
    if limit:
        segs = segs[:limit]
    audio = SegmentAudio()

    def read(seg: Segment) -> AlignedSegment:
        duration = audio.duration(seg)
        tg = alignments / f"{seg.id}.TextGrid"
        words = read_words(tg)
        check_word_ends(words, duration, tg)
        return AlignedSegment(seg, words, duration)
    return [(seg.id, lambda seg=seg: read(seg)) for seg in segs]


def load_glossary_arg(glossary: str | Path | Glossary, alt2main: str | Path | None, log=print) -> Glossary:
    return glossary if isinstance(glossary, Glossary) else load_glossary(glossary, alt2main, log=log)


def prepare(segments: str | Path, alignments: str | Path, glossary: str | Path | Glossary,
            out: str | Path, *, alt2main: str | Path | None = None, limit: int = 0, log=print,
            **options) -> dict:
    """`prepare_aligned` on a segments TSV and its folder of MFA TextGrids (the first `limit`
    segments when limit > 0); `options` are prepare_aligned's."""
    gloss = load_glossary_arg(glossary, alt2main, log)
    return prepare_aligned(tsv_segments(segments, alignments, limit), gloss, out, log=log, **options)


def prepare_aligned(source: SegmentSource, glossary: Glossary, out: str | Path, *, context: float = 1.0,
                    noterm_ratio: float = 0.1, noterm_length: str = "match", noterm_min: float = 2.5,
                    noterm_max: float = 4.0, max_ngram: int = 5, split_by: str = "none", dev_speakers=(),
                    test_speakers=(),
                    dev_ratio: float = 0.1, test_ratio: float = 0.1, seed: int = 0, skip_bad: bool = False,
                    split_name: str = "", pseudo_ratio: float = 0.0, pseudo_max_ngram: int = 2,
                    pseudo_min_letters: int = 4, pseudo_length_power: float = 1.0,
                    pseudo_max_per_term: int = 5, pseudo_exclude=(), pseudo_term_free: bool = True,
                    log=print) -> dict:
    """Cut the aligned segments of `source` (tsv_segments, lhotse_io.lhotse_segments) into chunks;
    write `{train,dev,test}.jsonl` into `out` (without a split: `<split_name>.jsonl`, or
    `chunks.jsonl` when split_name is empty); return a summary.

    No-term chunks, `noterm_ratio` per term chunk of a split: with `noterm_length` "match" each is as
    long as one of the split's term chunks drawn at random (a split without term chunks draws from
    all splits' term chunks; with none anywhere, from the band); with "band" their lengths are
    uniform in `noterm_min`..`noterm_max` seconds, which a model can tell from ~2 s term chunks.

    With `pseudo_ratio` > 0 the train split also gets pseudo-term chunks (stage1_extract/pseudo.py):
    `pseudo_ratio` per term chunk, a weighted sample over all train candidates, at most
    `pseudo_max_per_term` per pseudo-term; no word of the glossary (any split) nor of the term lists
    in `pseudo_exclude` (glossary files) is ever part of one; with `pseudo_term_free` no pseudo
    chunk overlaps a glossary term's words."""
    t_start = time.time()
    out = Path(out)
    gloss = glossary
    forms = gloss.surface_forms()
    if split_by not in ("speaker", "ratio", "none", ""):
        raise BadInput(f"unknown split_by {split_by!r}", fix="use speaker, ratio or none")
    if split_by == "speaker" and not (dev_speakers or test_speakers):
        raise BadInput("--split-by speaker needs --dev-speakers and/or --test-speakers")
    if split_name and split_by in ("speaker", "ratio"):
        raise BadInput(f"--split-name {split_name!r} names the one split of --split-by none; "
                       f"--split-by {split_by} makes train/dev/test", fix="drop one of them")
    if split_name and (split_name in ("chunks", "rejected") or not split_name.isidentifier()):
        raise BadInput(f"--split-name {split_name!r} is not usable as a manifest name",
                       fix="use letters, digits and _ (e.g. heldout), not chunks or rejected")
    if noterm_length not in NOTERM_LENGTHS:
        raise BadInput(f"unknown noterm_length {noterm_length!r}", file="config [data]",
                       fix="use match (as long as the split's term chunks) or band (noterm_min..noterm_max)")
    if not 0 < noterm_min <= noterm_max:
        raise BadInput(f"noterm_min {noterm_min} and noterm_max {noterm_max} are no band of seconds",
                       file="config [data]", fix="give 0 < noterm_min <= noterm_max")
    if noterm_ratio < 0:
        raise BadInput(f"noterm_ratio {noterm_ratio} is below 0", file="config [data]", fix="give 0 or more")
    if pseudo_ratio < 0 or pseudo_max_ngram < 1 or pseudo_min_letters < 1 or pseudo_max_per_term < 0:
        raise BadInput(f"pseudo settings out of range (ratio {pseudo_ratio}, max_ngram {pseudo_max_ngram}, "
                       f"min_letters {pseudo_min_letters}, max_per_term {pseudo_max_per_term})",
                       file="config [data]", fix="pseudo_ratio >= 0, max_ngram >= 1, min_letters >= 1, "
                                                 "max_per_term >= 0")
    excluded = frozenset()
    if pseudo_ratio > 0:
        excluded = excluded_words(gloss).union(
            *(excluded_words(load_glossary(p, None, log=lambda *_: None)) for p in pseudo_exclude))
    pseudo_pool: list = []
    rejects = RejectLog(out / "rejected.jsonl")
    skipped = Counter()
    rng = random.Random(seed)
    by_split: dict[str, list[Chunk]] = {}
    noterm_pool: dict[str, list[Chunk]] = {}          # "band": every candidate window
    stretches: dict[str, list[FreeStretch]] = {}       # "match": the term-free stretches
    for seg_id, read in tqdm(source, desc="prepare", unit="seg", mininterval=1.0):
        try:
            aligned = read()
        except BadInput as err:
            if not skip_bad:
                raise
            rejects.add(err, segment_id=seg_id)
            skipped[_reason_kind(err)] += 1
            continue
        seg, words, duration = aligned.seg, aligned.words, aligned.duration
        split = assign_split(seg, split_by, set(dev_speakers), set(test_speakers), dev_ratio,
                             test_ratio, seed) or split_name
        spans = find_terms(words, forms, max_ngram)
        by_split.setdefault(split, []).extend(segment_chunks(seg, words, spans, duration, context))
        if noterm_length == "band":
            noterm_pool.setdefault(split, []).extend(
                noterm_candidates(seg, words, spans, duration, noterm_min, noterm_max, rng))
        else:
            stretches.setdefault(split, []).extend(free_stretches(seg, words, spans, duration))
        if pseudo_ratio > 0 and split == "train":   # never dev/test: their words stay unseen
            pseudo_pool.extend(pseudo_chunks(seg, words, spans, duration, context, excluded, seed,
                                             pseudo_max_ngram, pseudo_min_letters, pseudo_length_power,
                                             pseudo_term_free))

    summary = {"segments_read": len(source), "segments_skipped": dict(skipped), "splits": {}}
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(set(by_split) | set(noterm_pool) | set(stretches))
    all_lengths = [c.audio_duration for chunks in by_split.values() for c in chunks]
    for split in names:
        chunks = by_split.get(split, [])
        missed = 0
        if noterm_length == "band":
            pool = noterm_pool.get(split, [])
            want = min(len(pool), max(1 if pool and noterm_ratio > 0 else 0, round(noterm_ratio * len(chunks))))
            noterm = random.Random(f"{seed}:{split}").sample(pool, want) if want else []
        else:
            free = stretches.get(split, [])
            want = max(1 if free and noterm_ratio > 0 else 0, round(noterm_ratio * len(chunks)))
            lengths = sorted(c.audio_duration for c in chunks) or sorted(all_lengths)
            noterm, missed = place_noterm(free, lengths, want, random.Random(f"{seed}:noterm:{split}"),
                                          band=(noterm_min, noterm_max))
            if missed:
                log(f"{split or 'all'}: {missed} of {want} no-term chunk lengths found no term-free place "
                    "long enough; the no-term chunks are a little shorter than the term chunks")
        noterm.sort(key=lambda c: c.id)
        pseudo = []
        if split == "train" and pseudo_pool:
            pseudo = [c for _, c in choose(pseudo_pool, round(pseudo_ratio * len(chunks)),
                                           pseudo_max_per_term, key=lambda item: item[0])]
            pseudo.sort(key=lambda c: c.id)
        allc = chunks + noterm + pseudo
        for c in allc:
            c.split = split
        write_chunks(allc, out / f"{split or 'chunks'}.jsonl")
        summary["splits"][split or "all"] = {
            "term_chunks": len(chunks), "distinct_terms": len({t for c in chunks for t in c.terms}),
            "noterm_chunks": len(noterm), **({"noterm_lengths_given_up": missed} if missed else {}),
            "pseudo_chunks": len(pseudo),
            "distinct_pseudo_terms": len({p for c in pseudo for p in c.pseudo_terms}),
            "audio_hours": round(sum(c.audio_duration for c in allc) / 3600, 3)}
    rejects.write()
    if pseudo_ratio > 0:
        summary["pseudo_candidates"] = len(pseudo_pool)
        summary["pseudo_candidate_terms"] = len({p.text for p, _ in pseudo_pool})
        if "train" not in by_split:
            log("data.pseudo_ratio > 0 but there is no train split: no pseudo-term chunks written")
    summary["rejected"] = len(rejects)
    summary["seconds"] = round(time.time() - t_start, 2)
    (out / "prepare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, log)
    if skip_bad and len(rejects):
        log(f"skipped {len(rejects)} segments: written to {rejects.path}")
    return summary


def _reason_kind(err: BadInput) -> str:
    r = err.reason
    for key in ("TextGrid missing", "malformed TextGrid", "no 'words' tier", "overlapping",
                "audio file missing", "empty", "unreadable", "past the end", "shorter", "before the segment",
                "past the segment"):
        if key in r:
            return key
    return r[:40]


def _print_summary(s: dict, log) -> None:
    log(f"{'split':<8}{'term chunks':>12}{'terms':>8}{'no-term':>9}{'pseudo':>8}{'p-terms':>9}{'hours':>8}")
    for split, v in s["splits"].items():
        log(f"{split:<8}{v['term_chunks']:>12}{v['distinct_terms']:>8}{v['noterm_chunks']:>9}"
            f"{v['pseudo_chunks']:>8}{v['distinct_pseudo_terms']:>9}{v['audio_hours']:>8.2f}")
    skipped = ", ".join(f"{k}: {n}" for k, n in s["segments_skipped"].items()) or "none"
    pseudo = {}
    if "pseudo_candidates" in s:   # only when pseudo-terms are on, so the line is unchanged otherwise
        pseudo = {"pseudo_chunks": sum(v["pseudo_chunks"] for v in s["splits"].values()),
                  "pseudo_terms": sum(v["distinct_pseudo_terms"] for v in s["splits"].values()),
                  "pseudo_candidates": s["pseudo_candidates"]}
    log(figures(segments=s["segments_read"], skipped=sum(s["segments_skipped"].values()), **pseudo,
                seconds=s["seconds"]) + f" (skipped: {skipped})")


def _speakers(value: str | None) -> list[str]:
    """Comma-separated list, or @file with one speaker per line."""
    if not value:
        return []
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise BadInput("speaker list file does not exist", file=path)
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command("prepare")
@config_options
@click.option("--segments", help="Segments TSV (id, audio, n_frames, speaker, src_text, src_lang). [data.segments]")
@click.option("--alignments", help="Folder of MFA TextGrids, one <segment id>.TextGrid each. [data.alignments]")
@click.option("--cuts", help="Instead of --segments/--alignments: a lhotse CutSet (e.g. cuts.jsonl.gz) whose "
              "supervisions carry word alignments (alignment['word']).")
@click.option("--recordings", help="Instead of --cuts: a lhotse RecordingSet manifest (with --supervisions).")
@click.option("--supervisions", help="Instead of --cuts: a lhotse SupervisionSet manifest with word alignments "
              "(with --recordings).")
@click.option("--glossary", help="Glossary: the seed's dict JSON, a JSON list, or one term per line. [data.glossary]")
@click.option("--alt2main", help="Alias map JSON {alias: main term}; '' for none. [data.alt2main]")
@click.option("--out", help="Output folder for the manifests. [data.chunks]")
@click.option("--split-by", type=click.Choice(["speaker", "ratio", "none"]),
              help="How to split: by speaker lists, by a seeded ratio of segments, or not at all. [data.split_by]")
@click.option("--dev-speakers", help="Dev speakers: comma-separated, or @file with one per line.")
@click.option("--test-speakers", help="Test speakers: comma-separated, or @file with one per line.")
@click.option("--split-file", type=click.Path(dir_okay=False),
              help='JSON {"dev_speakers": [...], "test_speakers": [...]} (what demo-corpus writes).')
@click.option("--split-name", help="With --split-by none: the split's name, written as OUT/<name>.jsonl "
              "(e.g. heldout); default chunks.jsonl, split 'all'. [data.split_name]")
@click.option("--skip-bad", is_flag=True, help="Skip bad segments into OUT/rejected.jsonl instead of stopping.")
@click.option("--limit", type=int, default=0, help="Only the first N segments (quick mode).")
def prepare_command(cfg: Config, segments, alignments, cuts, recordings, supervisions, glossary, alt2main, out,
                    split_by, dev_speakers, test_speakers, split_file, split_name, skip_bad, limit):
    """Cut term-level chunks (and no-term chunks) from aligned segments into JSONL manifests.

    Input: a segments TSV + MFA TextGrids, or a lhotse CutSet (--cuts) or RecordingSet +
    SupervisionSet (--recordings, --supervisions) with word alignments; both give the same chunks.

    Context, no-term ratio and lengths come from the config: data.context, data.noterm_ratio,
    data.noterm_length (match: no-term chunks as long as the split's term chunks; band: uniform in
    data.noterm_min..data.noterm_max seconds), data.max_ngram, data.dev_ratio, data.test_ratio,
    data.seed.
    Pseudo-term chunks in train (off by default): data.pseudo_ratio, data.pseudo_max_ngram,
    data.pseudo_min_letters, data.pseudo_length_power, data.pseudo_max_per_term, data.pseudo_term_free,
    data.pseudo_exclude.
    """
    d = cfg.data
    dev, test = _speakers(dev_speakers), _speakers(test_speakers)
    if split_file:
        p = Path(split_file)
        if not p.is_file():
            raise BadInput("split file does not exist", file=p)
        spl = json.loads(p.read_text())
        dev, test = dev or spl.get("dev_speakers", []), test or spl.get("test_speakers", [])
    out = Path(out or d.chunks)
    alt = d.alt2main if alt2main is None else alt2main
    options = dict(
        alt2main=alt or None, context=d.context, noterm_ratio=d.noterm_ratio,
        noterm_length=d.noterm_length, noterm_min=d.noterm_min, noterm_max=d.noterm_max, max_ngram=d.max_ngram,
        split_by=split_by or d.split_by, dev_speakers=dev, test_speakers=test,
        dev_ratio=d.dev_ratio, test_ratio=d.test_ratio, seed=d.seed, skip_bad=skip_bad,
        limit=limit, split_name=d.split_name if split_name is None else split_name,
        pseudo_ratio=d.pseudo_ratio, pseudo_max_ngram=d.pseudo_max_ngram,
        pseudo_min_letters=d.pseudo_min_letters, pseudo_length_power=d.pseudo_length_power,
        pseudo_max_per_term=d.pseudo_max_per_term, pseudo_term_free=d.pseudo_term_free,
        pseudo_exclude=[p.strip() for p in d.pseudo_exclude.split(",") if p.strip()], log=click.echo)
    if cuts or recordings or supervisions:
        if segments or alignments:
            raise BadInput("--cuts (or --recordings + --supervisions) and --segments/--alignments are two "
                           "inputs", fix="give one of them")
        from stage1_extract.lhotse_io import prepare_lhotse   # lhotse is imported only on this path
        prepare_lhotse(glossary or d.glossary, out, cuts=cuts, recordings=recordings,
                       supervisions=supervisions, **options)
    else:
        prepare(segments or d.segments, alignments or d.alignments, glossary or d.glossary, out, **options)
    save_config(cfg, out / "config.json")
