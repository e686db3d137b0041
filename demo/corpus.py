"""The offline demo corpus: synthetic speech in exactly the users' input formats.

A new user has no GigaSpeech, MFA alignments or Wikidata glossary, so `demo-corpus` builds a
small stand-in with eSpeak NG (see `tts.py`) that then runs through the same `prepare` as real
data. It writes, under `out_dir`:

    glossary.json          the seed's dict format, every demo term (unspoken ones are distractors)
    alt2main.json          {alias lowercased: main term lowercased}
    segments.tsv           GigaSpeech manifest: id, audio, n_frames, speaker, src_text, src_lang;
                           audio = audio/<speaker>.wav:offset_samples:num_samples (16 kHz)
    audio/<speaker>.wav    one long 16 kHz mono PCM16 file per speaker, 0.3 s between segments
    alignments/<id>.TextGrid   a `words` tier per segment, times relative to the segment
    splits.json            {"dev_speakers": [...], "test_speakers": [...]}; train = the rest
    summary.json, DONE     figures per split; DONE (written last) holds the build parameters

Speakers are disjoint across splits; about 30% of the distinct terms spoken in dev and in test
are never spoken in train; each split's sentences come only from its own carriers, openers,
closers and no-term sentences (`demo.text.CARRIERS`), so no evaluated split shares a template
with train (or with another split). eSpeak's waveform state carries over between utterances,
so the speakers are synthesised in a fixed number of fresh processes, each with a fixed list of
speakers: the corpus is byte-identical for a seed whatever the number of workers.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from demo.glossary import DemoTerm, alt2main, glossary_dict, lexicon, load_demo_terms
from demo.text import CARRIERS, Carriers, SegmentText, compose, estimate_seconds, holds_exactly

CORPUS_VERSION = 3             # bump when the same parameters would give different files
SAMPLE_RATE = 16000
GAP_S = 0.3                     # silence between segments inside a speaker's long file
SPLITS = ("train", "dev", "test")
# term occurrences per split at scale 1: 10% above what the chunk manifests need (3000/500/1000)
TARGET_OCCURRENCES = {"train": 3300, "dev": 560, "test": 1110}
TERM_BAND = (3.0, 10.0)         # seconds per segment holding terms
NO_TERM_BAND = (4.0, 8.0)       # term-free segments: room for prepare's no-term chunks (~2 s)
NO_TERM_SHARE = 0.15
TWO_TERM_SHARE = 0.4
UNSEEN_SHARE = 0.3              # of the distinct terms spoken in dev/test, never spoken in train
EVAL_REPEATS = 3.0              # occurrences per distinct term in dev/test
ALIAS_SHARE = 0.35              # occurrences of a term with aliases spoken as an alias
DISTRACTOR_SHARE = 0.05         # glossary terms never spoken at all
N_CANDIDATES = 4
PROCESS_GROUPS = 4              # fixed speaker groups, one fresh process each (see above)

OUTPUT_NAMES = ("glossary.json", "alt2main.json", "segments.tsv", "splits.json", "summary.json",
                "audio", "alignments")


@dataclass(frozen=True)
class Speaker:
    id: str
    split: str
    voice: str          # eSpeak language voice file name
    variant: str        # espeak-ng-data/voices/!v
    rate: int           # words per minute
    pitch: int          # 0-100
    pitch_range: int    # 0-100


SPEAKERS = (
    Speaker("spk01", "train", "en-us", "m1", 165, 45, 50),
    Speaker("spk02", "train", "en", "f1", 175, 55, 60),
    Speaker("spk03", "train", "en-gb-scotland", "m3", 150, 40, 45),
    Speaker("spk04", "train", "en-us", "f2", 185, 60, 65),
    Speaker("spk05", "train", "en-gb-x-rp", "m2", 160, 35, 40),
    Speaker("spk06", "train", "en-029", "f4", 170, 58, 55),
    Speaker("spk07", "train", "en-us-nyc", "m4", 190, 50, 50),
    Speaker("spk08", "train", "en-gb-x-gbclan", "f5", 155, 62, 60),
    Speaker("spk09", "train", "en-us", "klatt", 180, 48, 50),
    Speaker("spk10", "train", "en-gb-x-gbcwmd", "m5", 165, 42, 45),
    Speaker("spk11", "train", "en-us", "robert", 145, 38, 55),
    Speaker("spk12", "train", "en", "klatt3", 195, 52, 40),
    Speaker("spk13", "train", "en-us", "belinda", 170, 56, 65),
    Speaker("spk14", "dev", "en-gb-scotland", "f3", 160, 64, 60),
    Speaker("spk15", "dev", "en-us", "m6", 185, 44, 45),
    Speaker("spk16", "dev", "en-029", "david", 150, 50, 50),
    Speaker("spk17", "test", "en-us-nyc", "linda", 175, 57, 55),
    Speaker("spk18", "test", "en-gb-x-rp", "m8", 165, 40, 50),
    Speaker("spk19", "test", "en-us", "klatt5", 200, 46, 45),
    Speaker("spk20", "test", "en-gb-x-gbcwmd", "steph", 140, 60, 60),
)


@dataclass(frozen=True)
class SegmentPlan:
    id: str
    speaker: str
    split: str
    candidates: tuple[SegmentText, ...]
    lead_s: float
    tail_s: float
    band: tuple[float, float]


# ---------------------------------------------------------------- planning (pure)

def split_targets(scale: float) -> dict[str, int]:
    return {s: max(1, math.ceil(n * scale)) for s, n in TARGET_OCCURRENCES.items()}


def plan_terms(terms: list[DemoTerm], targets: dict[str, int], rng: np.random.Generator
               ) -> dict[str, list[tuple[str, str]]]:
    """Term occurrences per split, as (spoken form, main key), in random order.

    The glossary is shuffled and cut into never-spoken distractors, test-only and dev-only terms
    (the unseen ones) and a shared pool that train speaks; dev and test mix their own terms with
    terms train has spoken, so that UNSEEN_SHARE of their distinct terms are unseen.
    """
    order = [terms[i] for i in rng.permutation(len(terms))]
    distinct = {s: math.ceil(targets[s] / EVAL_REPEATS) for s in ("dev", "test")}
    unseen = {s: math.ceil(UNSEEN_SHARE * distinct[s]) for s in ("dev", "test")}
    n_distractors = round(DISTRACTOR_SHARE * len(terms))
    cut = np.cumsum([n_distractors, unseen["test"], unseen["dev"]])
    test_only, dev_only, shared = order[cut[0]:cut[1]], order[cut[1]:cut[2]], order[cut[2]:]
    if len(shared) < 10:
        raise ValueError(f"scale too large for a glossary of {len(terms)} terms; lower --scale")
    n_train = min(len(shared), max(1, math.ceil(targets["train"] / 2)))
    spoken = {"train": shared[:n_train]}
    for split, own in (("dev", dev_only), ("test", test_only)):
        n_seen = min(distinct[split] - len(own), n_train)
        seen = [spoken["train"][i] for i in sorted(rng.choice(n_train, n_seen, replace=False))]
        spoken[split] = own + seen
    out = {}
    for split in SPLITS:
        chosen = spoken[split]
        counts = np.full(len(chosen), targets[split] // len(chosen))
        extra = targets[split] - counts.sum()
        counts[rng.choice(len(chosen), extra, replace=False)] += 1
        occurrences = []
        for term, count in zip(chosen, counts):
            for _ in range(count):
                if term.aliases and rng.random() < ALIAS_SHARE:
                    occurrences.append((str(rng.choice(term.aliases)), term.key))
                else:
                    occurrences.append((term.term, term.key))
        out[split] = [occurrences[i] for i in rng.permutation(len(occurrences))]
    return out


def group_segments(occurrences: list[tuple[str, str]], rng: np.random.Generator
                   ) -> list[list[tuple[str, str]]]:
    """Occurrences into segments of one or two distinct terms, plus empty (term-free) ones."""
    segments, i = [], 0
    while i < len(occurrences):
        pair = (i + 1 < len(occurrences) and occurrences[i][1] != occurrences[i + 1][1]
                and rng.random() < TWO_TERM_SHARE)
        segments.append(occurrences[i:i + 2] if pair else occurrences[i:i + 1])
        i += 2 if pair else 1
    n_none = round(NO_TERM_SHARE / (1 - NO_TERM_SHARE) * len(segments))
    segments.extend([] for _ in range(n_none))
    return [segments[i] for i in rng.permutation(len(segments))]


def candidates_for(terms: list[tuple[str, str]], rate_wpm: int, lead_tail: float,
                   band: tuple[float, float], lex: dict[str, str], rng: np.random.Generator,
                   carriers: Carriers) -> tuple[SegmentText, ...]:
    """Up to N_CANDIDATES transcripts made of `carriers` that hold exactly `terms`, those whose
    estimated length (at `rate_wpm`) fits the band first; the synthesiser keeps the first whose
    real length fits."""
    fitting, other = [], []
    lo, hi = band
    for _ in range(40):
        seg = compose(rng, terms, rate_wpm, (lo + 0.4 - lead_tail, hi), carriers)
        if not holds_exactly(seg, lex):
            continue
        est = estimate_seconds(seg.text, rate_wpm) + lead_tail
        (fitting if lo + 0.3 <= est <= hi - 0.8 else other).append(seg)
        if len(fitting) >= N_CANDIDATES:
            break
    found = (fitting + other)[:N_CANDIDATES]
    if not found:
        raise RuntimeError(f"no carrier sentence holds exactly {terms}; a template word forms a "
                           "glossary term with it: edit demo/text.py or demo/data/terms.tsv")
    return tuple(found)


def plan_corpus(terms: list[DemoTerm], seed: int, scale: float) -> list[SegmentPlan]:
    """Every segment: its speaker, split, candidate transcripts and silences around the speech."""
    targets = split_targets(scale)
    occurrences = plan_terms(terms, targets, np.random.default_rng([seed, 1]))
    lex = lexicon(terms)
    plans: list[SegmentPlan] = []
    for split_index, split in enumerate(SPLITS):
        speakers = [s for s in SPEAKERS if s.split == split]
        segments = group_segments(occurrences[split], np.random.default_rng([seed, 2, split_index]))
        per_speaker: dict[str, int] = {}
        for k, seg_terms in enumerate(segments):
            speaker = speakers[k % len(speakers)]
            n = per_speaker[speaker.id] = per_speaker.get(speaker.id, 0) + 1
            rng = np.random.default_rng([seed, 3, split_index, k])
            lead, tail = (float(round(x, 3)) for x in rng.uniform(0.15, 0.35, size=2))
            band = TERM_BAND if seg_terms else NO_TERM_BAND
            plans.append(SegmentPlan(
                id=f"{speaker.id}_{n:05d}", speaker=speaker.id, split=split,
                candidates=candidates_for(seg_terms, speaker.rate, lead + tail, band, lex, rng,
                                          CARRIERS[split]),
                lead_s=lead, tail_s=tail, band=band))
    return sorted(plans, key=lambda p: p.id)


# ---------------------------------------------------------------- synthesis (worker processes)

_PROGRESS = None


def _init_worker(progress_queue) -> None:
    global _PROGRESS
    _PROGRESS = progress_queue


def synthesise_group(job: dict) -> list[dict]:
    """Synthesise a fixed group of speakers, in order; run it in a fresh process."""
    from demo.tts import Synth

    synth = Synth(SAMPLE_RATE)
    return [seg for speaker, plans in job["speakers"]
            for seg in synthesise_speaker(synth, speaker, plans, Path(job["out_dir"]), job["seed"])]


def synthesise_speaker(synth, speaker: Speaker, plans: list[SegmentPlan], out_dir: Path,
                       seed: int) -> list[dict]:
    """Synthesise one speaker's segments into audio/<speaker>.wav and their TextGrids.

    Returns per segment the chosen transcript, its place in the long file and its word intervals.
    """
    import soundfile as sf

    channel = np.random.default_rng([seed, 4, int(speaker.id[3:])])
    gain = float(channel.uniform(0.55, 0.95))
    noise_rms = float(10 ** (channel.uniform(-62, -50) / 20))
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    pieces, results, offset = [gap], [], len(gap)
    for plan in plans:
        best = None
        for cand in plan.candidates:
            audio, words = synth.say(cand.text, voice=speaker.voice, variant=speaker.variant,
                                     rate=speaker.rate, pitch=speaker.pitch,
                                     pitch_range=speaker.pitch_range)
            if (tuple(w.lower() for w, _, _ in words) != cand.labels
                    or any(b <= a for _, a, b in words)):
                continue   # eSpeak split or dropped a token; the times would not match the words
            seconds = plan.lead_s + len(audio) / SAMPLE_RATE + plan.tail_s
            miss = max(plan.band[0] - seconds, seconds - plan.band[1], 0.0)
            if best is None or miss < best[0]:
                best = (miss, cand, audio, words)
            if miss == 0.0:
                break
        if best is None:
            raise RuntimeError(f"segment {plan.id}: eSpeak's words never matched the text of any "
                               f"candidate, e.g. {plan.candidates[0].text!r}")
        miss, cand, audio, words = best
        lead = np.zeros(int(round(plan.lead_s * SAMPLE_RATE)), np.float32)
        tail = np.zeros(int(round(plan.tail_s * SAMPLE_RATE)), np.float32)
        segment = np.concatenate([lead, audio * gain, tail])
        lead_s = len(lead) / SAMPLE_RATE
        intervals = [(w.lower(), round(a + lead_s, 4), round(b + lead_s, 4)) for w, a, b in words]
        write_textgrid(out_dir / "alignments" / f"{plan.id}.TextGrid", intervals,
                       len(segment) / SAMPLE_RATE)
        results.append({"id": plan.id, "speaker": speaker.id, "split": plan.split,
                        "text": cand.text, "offset": offset, "num_samples": len(segment),
                        "spans": [list(s) for s in cand.spans], "out_of_band": miss > 0,
                        "templates": list(cand.templates)})
        pieces += [segment, gap]
        offset += len(segment) + len(gap)
        if _PROGRESS is not None:
            _PROGRESS.put(1)
    signal = np.concatenate(pieces)
    signal += channel.normal(0.0, noise_rms, size=len(signal)).astype(np.float32)
    pcm = np.clip(np.round(signal * 32767.0), -32768, 32767).astype(np.int16)
    sf.write(out_dir / "audio" / f"{speaker.id}.wav", pcm, SAMPLE_RATE, subtype="PCM_16",
             format="WAV")
    return results


def write_textgrid(path: Path, words: list[tuple[str, float, float]], duration: float) -> None:
    """A Praat TextGrid with one `words` tier: the words, `sil` for pauses between words, and
    empty intervals (praatio fills them) for the silence before the first and after the last."""
    from praatio import textgrid

    entries = []
    for i, (word, start, end) in enumerate(words):
        if i > 0 and start - entries[-1][1] >= 0.02:
            entries.append((entries[-1][1], start, "sil"))
        entries.append((start, min(end, duration), word))
    tg = textgrid.Textgrid()
    tg.addTier(textgrid.IntervalTier("words", entries, 0.0, duration))
    tg.save(str(path), format="long_textgrid", includeBlankSpaces=True)


def run_groups(target, init, jobs: list[dict], workers: int, total: int, desc: str) -> list[dict]:
    """`target(job)` for every job, each in a fresh spawned process (a fresh synthesiser, never a forked
    copy of one: see the module docstring), with one progress bar fed through `init`'s queue."""
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    results: list[dict] = []
    with ctx.Pool(workers, initializer=init, initargs=(progress,),
                  maxtasksperchild=1) as pool, \
            tqdm(total=total, unit="seg", desc=desc, smoothing=0.1) as bar:
        pending = {i: pool.apply_async(target, (job,)) for i, job in enumerate(jobs)}
        while pending:
            try:
                while True:
                    bar.update(progress.get(timeout=0.2))
            except queue.Empty:
                pass
            for sid in [s for s, r in pending.items() if r.ready()]:
                results += pending.pop(sid).get()   # re-raises a worker's error here
        while True:
            try:
                bar.update(progress.get_nowait())
            except queue.Empty:
                break
    return results


# ---------------------------------------------------------------- the corpus

def _params(seed: int, scale: float) -> dict:
    return {"version": CORPUS_VERSION, "seed": seed, "scale": scale}


def corpus_summary(segments: list[dict]) -> dict:
    """Figures per split from the synthesised segments (what prepare will find)."""
    train_terms = {key for s in segments if s["split"] == "train" for *_, key in s["spans"]}
    out = {}
    for split in SPLITS:
        rows = [s for s in segments if s["split"] == split]
        keys = [key for s in rows for *_, key in s["spans"]]
        distinct = set(keys)
        out[split] = {
            "segments": len(rows),
            "speakers": len({s["speaker"] for s in rows}),
            "hours": round(sum(s["num_samples"] for s in rows) / SAMPLE_RATE / 3600, 3),
            "term_occurrences": len(keys),
            "distinct_terms": len(distinct),
            "unseen_share": round(len(distinct - train_terms) / max(len(distinct), 1), 3),
            "two_term_segments": sum(1 for s in rows if len(s["spans"]) == 2),
            "no_term_segments": sum(1 for s in rows if not s["spans"]),
            "out_of_band_segments": sum(1 for s in rows if s["out_of_band"]),
            "templates_used": len({t for s in rows for t in s["templates"]}),
        }
    return out


def format_summary(summary: dict, seconds: float | None = None) -> str:
    cols = ("segments", "speakers", "hours", "term_occurrences", "distinct_terms", "unseen_share",
            "two_term_segments", "no_term_segments", "out_of_band_segments")
    heads = ("segments", "speakers", "hours", "term occ.", "distinct", "unseen", "2-term",
             "no-term", "off-band")
    lines = ["split  " + " ".join(f"{h:>9}" for h in heads)]
    for split in SPLITS:
        row = summary["splits"][split]
        lines.append(f"{split:<6} " + " ".join(f"{row[c]:>9}" for c in cols))
    tail = (f"glossary {summary['glossary_terms']} terms ({summary['aliases']} aliases), "
            f"{summary['audio_files']} audio files, {summary['megabytes']} MB")
    if seconds is not None:
        n = sum(summary["splits"][split]["segments"] for split in SPLITS)
        tail += f", {n / max(seconds, 1e-9):.1f} segments/s, {seconds:.1f} s"
    return "\n".join(lines + [tail])


def build_demo_corpus(out_dir: str | Path, seed: int = 0, scale: float = 1.0,
                      workers: int | None = None, terms_path: str | Path | None = None,
                      verbose: bool = True) -> dict:
    """Synthesise the demo corpus into `out_dir`, or reuse it when DONE holds the same parameters.

    scale multiplies the term occurrences per split (3300/560/1110 at scale 1); tests use ~0.03.
    Returns the summary: per split figures, glossary size, "reused" and "seconds".
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    params = _params(seed, scale)
    done = out_dir / "DONE"
    summary = previous_build(out_dir, params)
    if summary is not None:
        summary.update(reused=True, seconds=round(time.perf_counter() - t0, 3))
        if verbose:
            print(f"demo corpus in {out_dir} is complete (seed {seed}, scale {scale}): reusing it")
            print(format_summary(summary))
        return summary
    clear_outputs(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    (out_dir / "alignments").mkdir(parents=True, exist_ok=True)

    terms = load_demo_terms(terms_path) if terms_path else load_demo_terms()
    plans = plan_corpus(terms, seed, scale)
    by_speaker = {s.id: [p for p in plans if p.speaker == s.id] for s in SPEAKERS}
    jobs = [{"speakers": [(s, by_speaker[s.id]) for s in SPEAKERS[g::PROCESS_GROUPS]
                          if by_speaker[s.id]],
             "out_dir": str(out_dir), "seed": seed} for g in range(PROCESS_GROUPS)]
    jobs = [j for j in jobs if j["speakers"]]
    workers = max(1, min(workers or min(2, os.cpu_count() or 1), len(jobs)))
    segments = sorted(run_groups(synthesise_group, _init_worker, jobs, workers, len(plans), "synthesising"),
                      key=lambda s: s["id"])

    write_json(out_dir / "glossary.json", glossary_dict(terms))
    write_json(out_dir / "alt2main.json", alt2main(terms))
    write_json(out_dir / "splits.json", {
        "dev_speakers": [s.id for s in SPEAKERS if s.split == "dev"],
        "test_speakers": [s.id for s in SPEAKERS if s.split == "test"]})
    with open(out_dir / "segments.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\n")
        for s in segments:
            audio = f"audio/{s['speaker']}.wav:{s['offset']}:{s['num_samples']}"
            f.write(f"{s['id']}\t{audio}\t{s['num_samples']}\t{s['speaker']}\t{s['text']}\ten\n")
    audio_bytes = sum(p.stat().st_size for p in (out_dir / "audio").glob("*.wav"))
    summary = {
        "params": params,
        "splits": corpus_summary(segments),
        "speakers": {s.id: {**asdict(s)} for s in SPEAKERS},
        "glossary_terms": len(terms),
        "aliases": len(alt2main(terms)),
        "audio_files": len({s["speaker"] for s in segments}),
        "megabytes": round(audio_bytes / 1e6, 1),
    }
    write_json(out_dir / "summary.json", summary)
    done.write_text(json.dumps(params) + "\n")
    summary.update(reused=False, seconds=round(time.perf_counter() - t0, 1))
    if verbose:
        print(format_summary(summary, summary["seconds"]))
    return summary


def previous_build(out_dir: Path, params: dict) -> dict | None:
    """The summary of a complete build in `out_dir` made with the same parameters (its DONE file,
    written last, holds them), or None: then the folder is rebuilt."""
    done, summary = out_dir / "DONE", out_dir / "summary.json"
    if not (done.is_file() and summary.is_file()):
        return None
    try:
        if json.loads(done.read_text()) != params:
            return None
    except json.JSONDecodeError:
        return None
    return json.loads(summary.read_text())


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def clear_outputs(out_dir: Path, names=OUTPUT_NAMES) -> None:
    """Remove a previous (partial or different) build: its DONE mark first, then only the files the
    builder writes (`names`), never anything else in the folder."""
    (out_dir / "DONE").unlink(missing_ok=True)
    for name in names:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@click.command("demo-corpus")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="cache/demo/corpus",
              show_default=True, help="Folder for the corpus (segments.tsv, audio/, alignments/, "
              "glossary.json, alt2main.json, splits.json).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed and scale give a byte-identical corpus.")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Multiplier on the corpus size (1.0 = 3300/560/1110 term occurrences in "
              "train/dev/test); e.g. 0.03 for a quick test corpus.")
@click.option("--workers", type=int, default=None,
              help="Synthesis processes (default: min(2, CPUs)); does not change the output.")
def demo_corpus_command(out_dir: str, seed: int, scale: float, workers: int | None) -> None:
    """Synthesise the offline demo corpus with eSpeak NG, in the users' input formats.

    Reruns with the same parameters reuse a complete corpus (marked by the DONE file).
    """
    if scale <= 0:
        raise click.BadParameter("must be > 0", param_hint="--scale")
    build_demo_corpus(out_dir, seed=seed, scale=scale, workers=workers)
