"""`talk`: what a simultaneous translator receives over whole talks, at the run's default threshold.

The chunk-level report (`eval`) scores term-centred chunks; a translator instead gets the hints of every
window of a whole recording. This streams each recording (a *talk*: one audio file of a segments TSV,
its segments inside it at their offsets) through `Retriever.stream` and scores the hints against the
term occurrences that the alignments give (found by `prepare`'s own `find_terms`, times shifted by each
segment's offset):

- a term occurrence is *found* when a window overlapping its span proposes it among the window's top K
  over the threshold; its *delay* is that first window's end (when the hint is available: a window is
  scored once its last sample arrived) minus the term's end (negative when the hint came before the
  term was over);
- a *false hint* is a (window, term) hint whose term is not spoken in a span overlapping the window,
  counted per minute of speech (the segments' time); precision = true hints / all hints;
- hints per window = all hints / windows.

Three systems over the same windows, each at a threshold picked on the run's dev split, never on the
talks (`retriever.dev_picks`): *ours* (audio only, the run's dev threshold, what `query` uses), the
*cascade* (the backbone's ASR per window + fuzzy match, stage3_index/cascade.py; its threshold keeps
`eval.keep_hits` of dev's top-1 fuzzy hits, the audio threshold's rule) and *ours + transcript* (the same
transcript fused with the audio scores with dev's weight and fused threshold, `Retriever(asr=...)`). The
ASR runs once per window and serves both. Without dev transcripts only ours is reported.

`--max-minutes` keeps each talk's first whole segments up to that much audio (the audio ends with the
last kept segment, so no term is cut in two) and `--max-talks` the first talks: `make`'s time budget.
Seen/unseen: a term is seen when the run trained on a chunk holding it (eval's rule).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from shared.audio import SAMPLE_RATE, read_audio
from shared.cli import figures
from shared.errors import BadInput
from shared.glossary import Glossary, load_glossary, normalize

STREAM_BATCH = 16       # windows per backbone/ASR call: same windows and hints as 1, several times faster


# ---------------------------------------------------------------- the truth: term spans per talk

@dataclass(frozen=True)
class Occurrence:
    key: str          # canonical main key
    start: float      # seconds from the start of the talk's audio file
    end: float


@dataclass
class Talk:
    name: str
    audio: str                                                     # the audio file
    segments: list[tuple[float, float]] = field(default_factory=list)   # (start, end) seconds in the file
    occurrences: list[Occurrence] = field(default_factory=list)
    end: float | None = None                                       # seconds of audio evaluated; None = all

    @property
    def speech_seconds(self) -> float:
        return float(sum(e - s for s, e in self.segments))


def read_talks(segments: str | Path, alignments: str | Path, glossary: Glossary, max_ngram: int = 5) -> list[Talk]:
    """One Talk per audio file of the segments TSV, in order of first appearance, each with its segments'
    spans and its term occurrences, through prepare's own reader and term finder."""
    from stage1_extract.prepare import find_terms, tsv_segments
    forms = glossary.surface_forms()
    talks: dict[str, Talk] = {}
    for _, read in tsv_segments(segments, alignments):
        a = read()
        seg = a.seg
        if seg.audio not in talks:
            talks[seg.audio] = Talk(Path(seg.audio).stem, seg.audio)
        t = talks[seg.audio]
        t.segments.append((seg.start, seg.start + a.duration))
        for sp in find_terms(a.words, forms, max_ngram):
            t.occurrences.append(Occurrence(sp.key, round(seg.start + sp.start(a.words), 4),
                                            round(seg.start + sp.end(a.words), 4)))
    out = list(talks.values())
    names = [t.name for t in out]
    for t in out:
        t.segments.sort()
        t.occurrences.sort(key=lambda o: (o.start, o.end, o.key))
        if names.count(t.name) > 1:      # same file name in two folders: the path tells them apart
            t.name = str(Path(t.audio).with_suffix("")).strip("/").replace("/", "_")
    return out


def limit_talk(talk: Talk, max_seconds: float) -> Talk:
    """The talk's first whole segments ending within `max_seconds` (at least one), its audio cut at the
    last one's end and only the occurrences inside; the talk itself when max_seconds <= 0."""
    if max_seconds <= 0:
        return talk
    kept = [s for s in talk.segments if s[1] <= max_seconds] or talk.segments[:1]
    if len(kept) == len(talk.segments):
        return talk
    end = max(e for _, e in kept)
    return Talk(talk.name, talk.audio, list(kept), [o for o in talk.occurrences if o.end <= end], end)


# ---------------------------------------------------------------- scoring hints against the truth

@dataclass
class HintCounts:
    """What one system's hints over some talks add up to."""
    occurrences: int = 0
    found: int = 0
    unseen_occurrences: int = 0
    unseen_found: int = 0
    windows: int = 0
    hints: int = 0
    false_hints: int = 0
    speech_seconds: float = 0.0
    delays: list[float] = field(default_factory=list)

    def __add__(self, other: "HintCounts") -> "HintCounts":
        return HintCounts(*(getattr(self, f) + getattr(other, f) for f in (
            "occurrences", "found", "unseen_occurrences", "unseen_found", "windows", "hints", "false_hints",
            "speech_seconds", "delays")))

    def figures(self) -> dict:
        d = np.asarray(self.delays, dtype=np.float64)
        minutes = self.speech_seconds / 60

        def ratio(a, b):
            return round(a / b, 4) if b else None
        return {"occurrences": self.occurrences, "found": self.found, "found_rate": ratio(self.found, self.occurrences),
                "unseen_occurrences": self.unseen_occurrences,
                "unseen_found_rate": ratio(self.unseen_found, self.unseen_occurrences),
                "windows": self.windows, "hints": self.hints, "false_hints": self.false_hints,
                "false_hints_per_min": ratio(self.false_hints, minutes),
                "hints_per_window": ratio(self.hints, self.windows),
                "precision": ratio(self.hints - self.false_hints, self.hints),
                "delay_median": round(float(np.median(d)), 3) if d.size else None,
                "delay_p90": round(float(np.percentile(d, 90)), 3) if d.size else None,
                "speech_minutes": round(minutes, 3)}


def count_hints(windows: list[tuple[float, float, list[str]]], truth: list[Occurrence], speech_seconds: float,
                unseen: set[str] = frozenset()) -> HintCounts:
    """Score one talk's hints: windows = (start, end, hinted main keys) in time order; truth = the talk's
    occurrences; unseen = keys of terms the run never trained on (normalised). See the module docstring."""
    c = HintCounts(occurrences=len(truth), windows=len(windows), speech_seconds=float(speech_seconds))
    first = [None] * len(truth)          # end of the first window that hinted each occurrence
    by_key: dict[str, list[int]] = {}
    for i, o in enumerate(truth):
        by_key.setdefault(o.key, []).append(i)
    for ws, we, keys in windows:
        for key in dict.fromkeys(keys):          # a term hinted twice in one window is one hint
            c.hints += 1
            hit = [i for i in by_key.get(key, ()) if ws < truth[i].end and we > truth[i].start]
            if not hit:
                c.false_hints += 1
            for i in hit:
                if first[i] is None or we < first[i]:
                    first[i] = we
    for o, f in zip(truth, first):
        is_unseen = normalize(o.key) in unseen
        c.unseen_occurrences += is_unseen
        if f is not None:
            c.found += 1
            c.unseen_found += is_unseen
            c.delays.append(round(f - o.end, 4))
    return c


# ---------------------------------------------------------------- streaming the talks

class _Timed:
    """Delegates to an object and adds up the seconds spent in one of its methods."""

    def __init__(self, inner, method: str):
        self.inner, self.method, self.seconds = inner, method, 0.0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return attr(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def stream_talk(r, wav: np.ndarray, top_k: int, block: int, progress=None) -> list[dict]:
    """Every window of a recording pushed through `Retriever.stream` in blocks (with term ids);
    `progress(seconds)` after each block."""
    s = r.stream(top_k, batch=STREAM_BATCH, with_id=True)
    out = []
    for b in range(0, len(wav), block):
        out += s.push(wav[b:b + block])
        if progress:
            progress(len(wav[b:b + block]) / SAMPLE_RATE)
    return out + s.flush()


SYSTEMS = ("ours", "cascade", "fused")
LABELS = {"ours": "ours (audio only)", "cascade": "cascade (the backbone's ASR per window + fuzzy match)",
          "fused": "ours + transcript"}


def cascade_matcher(r, scorer: str | None):
    """The cascade's matcher over the searched glossary with eval's cascade scorer (the fusion's own matcher
    when it uses the same scorer)."""
    from stage3_index.cascade import DEFAULT_SCORER, CascadeMatcher
    scorer = scorer or DEFAULT_SCORER
    if getattr(r.evidence.matcher, "scorer", DEFAULT_SCORER) == scorer:
        return r.evidence.matcher
    return CascadeMatcher(*r.glossary.forms(), scorer)


def system_hints(windows: list[dict], r, top_k: int, cascade_threshold: float | None,
                 matcher=None) -> dict[str, list]:
    """{system: [(start, end, hinted keys)]} of the streamed windows; `matcher` ranks the cascade's terms
    (the fusion's matcher by default)."""
    out = {"ours": []}
    ev = r.evidence
    if ev is not None:
        out["fused"], out["cascade"] = [], []
    for w in windows:
        span = (w["start"], w["end"])
        if ev is None:
            out["ours"].append((*span, [c["key"] for c in w["candidates"]]))
            continue
        out["ours"].append((*span, [c["key"] for c in w["audio_candidates"]]))
        out["fused"].append((*span, [c["key"] for c in w["candidates"]]))
        keys = []
        if cascade_threshold is not None:
            ids, scores = (matcher or ev.matcher).rank(w["transcript"], top_k)
            keys = [r.glossary.keys[int(t)] for t, sc in zip(ids, scores) if t >= 0 and sc >= cascade_threshold]
        out["cascade"].append((*span, keys))
    return out


def evaluate_talks(run: str | Path, segments: str | Path, alignments: str | Path, glossary: str | Path,
                   alt2main: str | Path | None = None, *, name: str | None = None, max_minutes: float = 0.0,
                   max_talks: int = 0, top_k: int = 5, transcript: bool = True, max_ngram: int = 5,
                   retriever=None, out: str | Path | None = None, log=print) -> dict:
    """Stream the talks of a corpus (segments TSV + TextGrids + glossary) through the run; write
    `report.json` and `report.md` into `out` (default RUN/talks/NAME/) and return the report."""
    from stage3_index.evaluate import trained_keys
    from stage3_index.retriever import Retriever
    from shared.cache import FeatureCache
    from tqdm import tqdm
    t_start = time.time()
    quiet, log = log is None, log or (lambda *_: None)
    run = Path(run)
    if top_k < 1:
        raise BadInput(f"--top-k {top_k}", fix="give 1 or more")
    name = name or Path(segments).resolve().parent.name
    out = Path(out) if out else run / "talks" / name
    gloss = load_glossary(glossary, alt2main, log=None)
    talks = read_talks(segments, alignments, gloss, max_ngram)
    if not talks:
        raise BadInput("no segments", file=segments, fix="give a segments TSV with at least one segment")
    all_talks = len(talks)
    talks = [limit_talk(t, max_minutes * 60) for t in talks[:max_talks or None]]
    r = retriever or Retriever.load(run, glossary=glossary, alt2main=alt2main, asr=True if transcript else None,
                                    log=log)
    if list(r.glossary.keys) != list(gloss.keys):
        raise BadInput("the retriever searches another glossary than the talks' truth uses", file=glossary,
                       fix="load the Retriever with the same glossary and alt2main")
    picks = r.evidence.picked if r.evidence is not None else {}
    cascade_threshold = picks.get("cascade_threshold")
    matcher = cascade_matcher(r, picks.get("cascade_scorer")) if r.evidence is not None else None
    unseen = set()
    if r.features is not None and r.config is not None:
        train = trained_keys(FeatureCache(r.features), r.config.train.limit)
        unseen = {normalize(k) for k in gloss.keys} - train
    backbone = r.backbone = _Timed(r.backbone, "audio_features")
    asr = None
    if r.evidence is not None:
        asr = r.evidence.asr = _Timed(r.evidence.asr, "transcribe")
    totals = {}
    talk_rows = []
    block = int(round(r.hop * SAMPLE_RATE)) * STREAM_BATCH
    from shared.audio import audio_info
    seconds = [t.end if t.end is not None else audio_info(t.audio)[1] / audio_info(t.audio)[0] for t in talks]
    bar = tqdm(total=round(sum(seconds)), desc=f"talks ({len(talks)})", unit="s of audio", disable=quiet,
               bar_format="{l_bar}{bar}| {n:.0f}/{total} s of audio [{elapsed}<{remaining}]")
    t0 = time.perf_counter()
    try:
        for talk in talks:
            wav = read_audio(talk.audio, 0.0, talk.end, allow_silent=True)
            windows = stream_talk(r, wav, top_k, block, bar.update)
            per = system_hints(windows, r, top_k, cascade_threshold, matcher)
            row = {"talk": talk.name, "audio": talk.audio, "audio_minutes": round(len(wav) / SAMPLE_RATE / 60, 3),
                   "speech_minutes": round(talk.speech_seconds / 60, 3), "segments": len(talk.segments),
                   "occurrences": len(talk.occurrences), "windows": len(windows)}
            for system, hints in per.items():
                c = count_hints(hints, talk.occurrences, talk.speech_seconds, unseen)
                totals[system] = totals.get(system, HintCounts()) + c
                row[system] = {k: v for k, v in c.figures().items() if k in ("found_rate", "false_hints_per_min")}
            talk_rows.append(row)
    finally:
        bar.close()
        r.backbone = backbone.inner
        if asr is not None:
            r.evidence.asr = asr.inner
    secs = time.perf_counter() - t0
    audio_min = sum(t["audio_minutes"] for t in talk_rows)
    systems = {}
    for s in SYSTEMS:
        if s not in totals:
            continue
        fig = totals[s].figures()
        fig["threshold"] = {"ours": r.threshold, "cascade": cascade_threshold,
                            "fused": r.evidence.threshold if r.evidence else None}[s]
        if s == "fused":
            fig["weight"] = r.evidence.weight
        systems[s] = fig
    notes = []
    if r.evidence is None:
        notes.append("cascade and ours + transcript not reported: " + (
            "the transcript was not asked for" if not transcript else "the run's dev split has no transcripts"))
    elif cascade_threshold is None:
        notes.append("cascade not reported: dev has no cascade top-1 hit to pick its threshold on")
        systems.pop("cascade", None)
    report = {"name": name, "run": str(run), "segments": str(segments), "glossary": str(glossary),
              "glossary_size": len(gloss), "talks": len(talk_rows), "talks_in_corpus": all_talks,
              "max_minutes": max_minutes or None, "audio_minutes": round(audio_min, 3),
              "top_k": top_k, "window": r.window, "hop": r.hop, "systems": systems, "per_talk": talk_rows,
              "thresholds": {"ours": "the run's dev-picked threshold (eval's rejection threshold)",
                             **({"cascade_and_fused": picks.get("how"), "dev_chunks": picks.get("dev_chunks")}
                                if picks else {})},
              "notes": notes,
              "seconds": {"total": round(secs, 1), "backbone": round(backbone.seconds, 1),
                          "asr": round(asr.seconds, 1) if asr else None,
                          "real_time_factor": round(secs / max(audio_min * 60, 1e-9), 4)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(talk_markdown(report))
    from shared.atomic import write_json_atomic
    write_json_atomic(out / "report.json", report)
    report["out"] = str(out)
    o = systems["ours"]
    line = dict(talks=len(talk_rows), minutes=round(audio_min, 1), terms=o["occurrences"], found=o["found_rate"],
                false_per_min=o["false_hints_per_min"], delay_p50=o["delay_median"])
    for s, short in (("cascade", "cascade"), ("fused", "fused")):
        if s in systems:
            line[f"{short}_found"] = systems[s]["found_rate"]
            line[f"{short}_false_per_min"] = systems[s]["false_hints_per_min"]
    line["seconds"] = round(time.time() - t_start, 1)
    log(figures(**line))
    return report


def _fmt(x, digits=3) -> str:
    return "" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def talk_markdown(rep: dict) -> str:
    lim = f", first {rep['max_minutes']:g} min of each" if rep.get("max_minutes") else ""
    lines = [f"## Talks: {rep['name']} ({rep['talks']} of {rep['talks_in_corpus']} talks{lim}, "
             f"{rep['audio_minutes']:.1f} min of audio, top {rep['top_k']} per {rep['window']} s window every "
             f"{rep['hop']} s, glossary {rep['glossary_size']:,} terms)", "",
             "| system | threshold (dev) | terms found | unseen found | false hints / min | hints / window | "
             "precision | delay median (s) | delay p90 (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for s, f in rep["systems"].items():
        label = LABELS[s] + (f" (weight {f['weight']:g})" if s == "fused" else "")
        lines.append(f"| {label} | {_fmt(f['threshold'])} | {_fmt(f['found_rate'])} ({f['found']}/{f['occurrences']}) "
                     f"| {_fmt(f['unseen_found_rate'])} | {_fmt(f['false_hints_per_min'], 2)} | "
                     f"{_fmt(f['hints_per_window'], 2)} | {_fmt(f['precision'])} | {_fmt(f['delay_median'], 2)} | "
                     f"{_fmt(f['delay_p90'], 2)} |")
    lines += ["", "A term is found when a window overlapping it hints it; a false hint names a term not spoken "
              "in the window; delay = the hinting window's end - the term's end."]
    lines += [f"Note: {n}" for n in rep.get("notes", [])]
    return "\n".join(lines) + "\n"


@click.command("talk")
@click.option("--run", required=True, type=click.Path(file_okay=False), help="Run folder (cache/runs/RUN).")
@click.option("--segments", required=True, type=click.Path(dir_okay=False),
              help="Segments TSV (audio = path or path:offset_samples:num_samples); each audio file is one talk.")
@click.option("--alignments", required=True, type=click.Path(file_okay=False),
              help="Folder of <segment id>.TextGrid word alignments (the truth's term spans).")
@click.option("--glossary", required=True, type=click.Path(dir_okay=False),
              help="The talks' glossary (any format prepare reads); searched by the run and used for the truth.")
@click.option("--alt2main", type=click.Path(dir_okay=False), default=None, help="Its alias map {alias: main}.")
@click.option("--name", default=None, help="Report folder name: RUN/talks/NAME/. [the segments TSV's folder name]")
@click.option("--max-minutes", type=float, default=0.0, show_default=True,
              help="Evaluate each talk's first whole segments up to this many minutes of audio (0 = all).")
@click.option("--max-talks", type=int, default=0, show_default=True, help="Evaluate the first N talks (0 = all).")
@click.option("--top-k", "top_k", type=int, default=5, show_default=True, help="Hints per window (over the threshold).")
@click.option("--no-transcript", is_flag=True,
              help="Ours only: no ASR per window, so no cascade and no ours + transcript.")
@click.option("--max-ngram", type=int, default=5, show_default=True,
              help="Longest term in words when finding terms in the alignments (prepare's data.max_ngram).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Report folder. [RUN/talks/NAME]")
@click.option("--quiet", is_flag=True, help="Do not print the markdown table.")
def talk_command(run, segments, alignments, glossary, alt2main, name, max_minutes, max_talks, top_k, no_transcript,
                 max_ngram, out, quiet):
    """Stream whole recordings through the run at its dev-picked threshold and score the hints a translator
    would get: terms found, false hints per minute of speech, hints per window, delay; beside the cascade and
    ours + transcript over the same windows (their thresholds and weight picked on the run's dev split)."""
    rep = evaluate_talks(run, segments, alignments, glossary, alt2main, name=name, max_minutes=max_minutes,
                         max_talks=max_talks, top_k=top_k, transcript=not no_transcript, max_ngram=max_ngram,
                         out=out, log=click.echo)
    if not quiet:
        click.echo(talk_markdown(rep))
    click.echo(f"report: {rep['out']}/report.json")
