"""`prepare`: segments + MFA TextGrids + glossary -> term-chunk manifests (DESIGN.md section 4).

A term chunk is a glossary term's aligned word span widened by `context` seconds each side
(clipped to the segment), pointing into the segment's audio; its ground-truth terms are every
glossary term whose whole span lies inside the chunk. No-term chunks are cut from stretches of
a segment that hold no term, so the model learns to reject.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

from shared.audio import audio_info
from shared.cli import config_options, figures
from shared.config import Config, save_config
from shared.errors import BadInput, RejectLog
from shared.glossary import Glossary, load_glossary, normalize
from shared.manifest import Chunk, Segment, read_segments, write_chunks

SILENCE = {"", "sil", "sp", "spn", "<eps>", "<unk>"}
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
    candidates = []
    for i in range(len(words)):
        for n in range(1, max_ngram + 1):
            if i + n > len(words):
                break
            key = " ".join(norm[i:i + n])
            if key in forms:
                candidates.append((n, i))
    # Longest match wins; among equals the earlier one. Greedy over that order gives no overlaps.
    candidates.sort(key=lambda c: (-c[0], c[1]))
    taken = [False] * len(words)
    spans = []
    for n, i in candidates:
        if any(taken[i:i + n]):
            continue
        for j in range(i, i + n):
            taken[j] = True
        spans.append(TermSpan(i, i + n - 1, forms[" ".join(norm[i:i + n])]))
    spans.sort(key=lambda s: s.first)
    return spans


def _words_inside(words: list[Word], start: float, end: float) -> list[Word]:
    # A word belongs to a window when its middle does: cut words at the edges count once.
    return [w for w in words if start <= (w.start + w.end) / 2 <= end]


def segment_chunks(seg: Segment, words: list[Word], spans: list[TermSpan], duration: float,
                   context: float) -> list[Chunk]:
    """One term chunk per term occurrence."""
    out = []
    for k, span in enumerate(spans):
        t0, t1 = span.start(words), span.end(words)
        s, e = max(0.0, t0 - context), min(duration, t1 + context)
        inside = [sp.key for sp in spans if sp.start(words) >= s - 1e-6 and sp.end(words) <= e + 1e-6]
        terms = list(dict.fromkeys([span.key] + inside))
        out.append(Chunk(
            id=f"{seg.id}_t{k}", audio=seg.audio, audio_offset=round(seg.start + s, 4),
            audio_duration=round(e - s, 4),
            term_chunk_text=" ".join(w.text for w in _words_inside(words, s, e)),
            term_chunk_audio_ground_truth_terms=terms, is_no_term_chunk=False, segment_id=seg.id,
            term_start_time=round(t0, 4), term_end_time=round(t1, 4),
            extended_start_time=round(s, 4), extended_end_time=round(e, 4), speaker=seg.speaker))
    return out


def noterm_candidates(seg: Segment, words: list[Word], spans: list[TermSpan], duration: float,
                      min_len: float, max_len: float, rng: random.Random) -> list[Chunk]:
    """Windows of min_len..max_len seconds that hold no term and at least two words."""
    busy = sorted((sp.start(words), sp.end(words)) for sp in spans)
    free, cursor = [], 0.0
    for s, e in busy:
        if s > cursor:
            free.append((cursor, s))
        cursor = max(cursor, e)
    if duration > cursor:
        free.append((cursor, duration))
    out = []
    for a, b in free:
        while b - a >= min_len:
            length = min(rng.uniform(min_len, max_len), b - a)
            inside = _words_inside(words, a, a + length)
            if len(inside) >= 2:
                out.append(Chunk(
                    id=f"{seg.id}_n{len(out)}", audio=seg.audio, audio_offset=round(seg.start + a, 4),
                    audio_duration=round(length, 4), term_chunk_text=" ".join(w.text for w in inside),
                    term_chunk_audio_ground_truth_terms=[], is_no_term_chunk=True, segment_id=seg.id,
                    extended_start_time=round(a, 4), extended_end_time=round(a + length, 4),
                    speaker=seg.speaker))
            a += length
    return out


def assign_split(seg: Segment, split_by: str, dev_speakers: set, test_speakers: set,
                 dev_ratio: float, test_ratio: float, seed: int) -> str:
    if split_by == "speaker":
        return "test" if seg.speaker in test_speakers else "dev" if seg.speaker in dev_speakers else "train"
    if split_by == "ratio":
        # Seeded per segment id, so adding segments never reshuffles the old ones.
        x = random.Random(f"{seed}:{seg.id}").random()
        return "test" if x < test_ratio else "dev" if x < test_ratio + dev_ratio else "train"
    return ""


def prepare(segments: str | Path, alignments: str | Path, glossary: str | Path | Glossary,
            out: str | Path, *, alt2main: str | Path | None = None, context: float = 1.0,
            noterm_ratio: float = 0.1, noterm_min: float = 2.5, noterm_max: float = 4.0,
            max_ngram: int = 5, split_by: str = "none", dev_speakers=(), test_speakers=(),
            dev_ratio: float = 0.1, test_ratio: float = 0.1, seed: int = 0, skip_bad: bool = False,
            limit: int = 0, log=print) -> dict:
    """Write `{train,dev,test}.jsonl` (or `chunks.jsonl` without a split) into `out`; return a summary."""
    t_start = time.time()
    out = Path(out)
    alignments = Path(alignments)
    gloss = glossary if isinstance(glossary, Glossary) else load_glossary(glossary, alt2main, log=log)
    forms = gloss.surface_forms()
    segs = read_segments(segments)
    if limit:
        segs = segs[:limit]
    if split_by not in ("speaker", "ratio", "none", ""):
        raise BadInput(f"unknown split_by {split_by!r}", fix="use speaker, ratio or none")
    if split_by == "speaker" and not (dev_speakers or test_speakers):
        raise BadInput("--split-by speaker needs --dev-speakers and/or --test-speakers")
    rejects = RejectLog(out / "rejected.jsonl")
    skipped = Counter()
    rng = random.Random(seed)
    by_split: dict[str, list[Chunk]] = {}
    noterm_pool: dict[str, list[Chunk]] = {}
    info_cache: dict[str, tuple[int, int]] = {}
    for seg in tqdm(segs, desc="prepare", unit="seg", mininterval=1.0):
        try:
            if seg.audio not in info_cache:
                info_cache[seg.audio] = audio_info(seg.audio, record=f"segment {seg.id}")
            sr, frames = info_cache[seg.audio]
            file_len = frames / sr
            if seg.start >= file_len:
                raise BadInput(f"segment {seg.id}: offset {seg.start:.2f}s past the end of the audio "
                               f"({file_len:.2f}s)", file=seg.audio, fix="check the segments TSV")
            duration = seg.duration if seg.duration is not None else file_len - seg.start
            if seg.start + duration > file_len + _TIME_TOLERANCE:
                raise BadInput(f"segment {seg.id}: audio ends at {file_len:.2f}s, before the segment "
                               f"end {seg.start + duration:.2f}s", file=seg.audio,
                               fix="the audio is shorter than the segment; check the TSV")
            tg = alignments / f"{seg.id}.TextGrid"
            words = read_words(tg)
            if words and words[-1].end > duration + _TIME_TOLERANCE:
                raise BadInput(f"word {words[-1].text!r} ends at {words[-1].end:.2f}s, past the segment's "
                               f"audio ({duration:.2f}s)", file=tg,
                               fix="the alignment does not fit the audio; re-align or drop with --skip-bad")
        except BadInput as err:
            if not skip_bad:
                raise
            rejects.add(err, segment_id=seg.id)
            skipped[_reason_kind(err)] += 1
            continue
        split = assign_split(seg, split_by, set(dev_speakers), set(test_speakers), dev_ratio,
                             test_ratio, seed)
        spans = find_terms(words, forms, max_ngram)
        by_split.setdefault(split, []).extend(segment_chunks(seg, words, spans, duration, context))
        noterm_pool.setdefault(split, []).extend(
            noterm_candidates(seg, words, spans, duration, noterm_min, noterm_max, rng))

    summary = {"segments_read": len(segs), "segments_skipped": dict(skipped), "splits": {}}
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(set(by_split) | set(noterm_pool))
    for split in names:
        chunks = by_split.get(split, [])
        pool = noterm_pool.get(split, [])
        want = min(len(pool), max(1 if pool else 0, round(noterm_ratio * len(chunks))))
        noterm = random.Random(f"{seed}:{split}").sample(pool, want) if want else []
        noterm.sort(key=lambda c: c.id)
        allc = chunks + noterm
        for c in allc:
            c.split = split
        write_chunks(allc, out / f"{split or 'chunks'}.jsonl")
        summary["splits"][split or "all"] = {
            "term_chunks": len(chunks), "distinct_terms": len({t for c in chunks for t in c.terms}),
            "noterm_chunks": len(noterm),
            "audio_hours": round(sum(c.audio_duration for c in allc) / 3600, 3)}
    rejects.write()
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
    log(f"{'split':<8}{'term chunks':>12}{'terms':>8}{'no-term':>9}{'hours':>8}")
    for split, v in s["splits"].items():
        log(f"{split:<8}{v['term_chunks']:>12}{v['distinct_terms']:>8}{v['noterm_chunks']:>9}"
            f"{v['audio_hours']:>8.2f}")
    skipped = ", ".join(f"{k}: {n}" for k, n in s["segments_skipped"].items()) or "none"
    log(figures(segments=s["segments_read"], skipped=sum(s["segments_skipped"].values()),
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
@click.option("--glossary", help="Glossary: the seed's dict JSON, a JSON list, or one term per line. [data.glossary]")
@click.option("--alt2main", help="Alias map JSON {alias: main term}; '' for none. [data.alt2main]")
@click.option("--out", help="Output folder for the manifests. [data.chunks]")
@click.option("--split-by", type=click.Choice(["speaker", "ratio", "none"]),
              help="How to split: by speaker lists, by a seeded ratio of segments, or not at all. [data.split_by]")
@click.option("--dev-speakers", help="Dev speakers: comma-separated, or @file with one per line.")
@click.option("--test-speakers", help="Test speakers: comma-separated, or @file with one per line.")
@click.option("--split-file", type=click.Path(dir_okay=False),
              help='JSON {"dev_speakers": [...], "test_speakers": [...]} (what demo-corpus writes).')
@click.option("--skip-bad", is_flag=True, help="Skip bad segments into OUT/rejected.jsonl instead of stopping.")
@click.option("--limit", type=int, default=0, help="Only the first N segments (quick mode).")
def prepare_command(cfg: Config, segments, alignments, glossary, alt2main, out, split_by, dev_speakers,
                    test_speakers, split_file, skip_bad, limit):
    """Cut term-level chunks (and no-term chunks) from aligned segments into JSONL manifests.

    Context, no-term ratio and lengths come from the config: data.context, data.noterm_ratio,
    data.noterm_min, data.noterm_max, data.max_ngram, data.dev_ratio, data.test_ratio, data.seed.
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
    prepare(segments or d.segments, alignments or d.alignments, glossary or d.glossary, out,
            alt2main=alt or None, context=d.context, noterm_ratio=d.noterm_ratio,
            noterm_min=d.noterm_min, noterm_max=d.noterm_max, max_ngram=d.max_ngram,
            split_by=split_by or d.split_by, dev_speakers=dev, test_speakers=test,
            dev_ratio=d.dev_ratio, test_ratio=d.test_ratio, seed=d.seed, skip_bad=skip_bad,
            limit=limit, log=click.echo)
    save_config(cfg, out / "config.json")
