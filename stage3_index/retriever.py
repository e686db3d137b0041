"""The streaming retriever: what a simultaneous translator calls at inference time.

It slides `window`-second windows with a `hop` over a recording, runs the frozen backbone and the
trained audio side on each, and keeps a term when it is a window's best match above the rejection
threshold in at least `min_votes` consecutive windows. Returns `[{term, score, start, end}]`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from shared.audio import SAMPLE_RATE, read_audio
from shared.cache import FeatureCache
from shared.config import config_from_dict
from shared.heads import RetrievalModel, embed, load_model
from shared.termside import embed_glossary


def windows(n_samples: int, window: float, hop: float, sr: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """(start, end) sample spans covering the recording; the last one ends at the end."""
    w, h = int(round(window * sr)), int(round(hop * sr))
    if n_samples <= w:
        return [(0, n_samples)]
    starts = list(range(0, n_samples - w + 1, h))
    if starts[-1] + w < n_samples:
        starts.append(n_samples - w)
    return [(s, s + w) for s in starts]


def vote(window_spans: list[tuple[float, float]], best: list[tuple[int, float]], threshold: float,
         min_votes: int = 1) -> list[tuple[int, float, float, float]]:
    """Runs of consecutive windows won by the same term above threshold -> (term, score, start, end)."""
    out, run = [], None
    for (s, e), (term, score) in zip(window_spans, best):
        accepted = term >= 0 and score >= threshold
        if run and accepted and term == run[0]:
            run = [term, max(run[1], score), run[2], e, run[4] + 1]
            continue
        if run and run[4] >= min_votes:
            out.append(tuple(run[:4]))
        run = [term, score, s, e, 1] if accepted else None
    if run and run[4] >= min_votes:
        out.append(tuple(run[:4]))
    return out


@dataclass
class Retriever:
    backbone: object
    model: RetrievalModel
    terms: list[str]                 # display form of each glossary id
    glossary: np.ndarray             # (G, P) trained text-side embeddings
    threshold: float
    window: float = 1.92
    hop: float = 0.96
    min_votes: int = 1
    owner: np.ndarray | None = None  # glossary row -> term id (rows are main forms and aliases)

    @classmethod
    def load(cls, run: str | Path, *, backbone=None, threshold: float | None = None) -> "Retriever":
        run = Path(run)
        ckpt_path = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
        model, ckpt = load_model(ckpt_path)
        cfg = config_from_dict(ckpt["config"])
        cache = FeatureCache(ckpt["spec"]["features"])
        gloss, owner = embed_glossary(model, cache)
        g = cache.read_json("glossary.json")
        if threshold is None:
            threshold = _threshold_of(run, model, cache, cfg.eval.keep_hits)
        if backbone is None:
            from stage1_extract.backbones import load_backbone
            backbone = load_backbone(cfg.backbone)
        return cls(backbone, model, g["texts"] if g.get("text_field") == "term" else g["keys"], gloss,
                   threshold, cfg.eval.window, cfg.eval.hop, cfg.eval.min_votes, owner)

    def scores(self, wav: np.ndarray) -> tuple[list[tuple[float, float]], np.ndarray]:
        """Window spans in seconds and each window's similarities to every glossary term (W, G)."""
        spans = windows(len(wav), self.window, self.hop)
        feats = self.backbone.audio_features([wav[s:e] for s, e in spans])
        emb = embed(self.model.audio, feats)
        return [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in spans], emb @ self.glossary.T

    def retrieve(self, audio: str | Path | np.ndarray) -> list[dict]:
        wav = audio if isinstance(audio, np.ndarray) else read_audio(audio, allow_silent=True)
        spans, sims = self.scores(wav)
        owner = self.owner if self.owner is not None else np.arange(sims.shape[1])
        best = [(int(owner[i]), float(r[i])) for r, i in zip(sims, sims.argmax(axis=1))]
        found = vote(spans, best, self.threshold, self.min_votes)
        return [{"term": self.terms[t], "score": round(sc, 4), "start": round(s, 2), "end": round(e, 2)}
                for t, sc, s, e in found]


def _threshold_of(run: Path, model, cache, keep_hits: float) -> float:
    """The dev-picked threshold from the run's report, or picked now on dev."""
    rep = run / "eval" / "test" / "report.json"
    if rep.is_file():
        t = json.loads(rep.read_text())["rejection"]["threshold"]
        if t is not None:
            return float(t)
    from stage3_index.evaluate import dev_threshold
    t = dev_threshold(model, cache, keep_hits, "Flat", log=lambda *_: None)
    return 0.0 if t is None else t


@click.command("query")
@click.option("--run", required=True, type=click.Path(file_okay=False), help="Run folder (cache/runs/RUN).")
@click.option("--audio", required=True, type=click.Path(dir_okay=False), help="WAV/FLAC file to scan.")
@click.option("--threshold", type=float, default=None,
              help="Score a window's best term must reach. [the dev-picked threshold of the run's eval]")
def query_command(run, audio, threshold):
    """Slide windows over AUDIO and print the glossary terms heard, with times (JSON lines)."""
    r = Retriever.load(run, threshold=threshold)
    for hit in r.retrieve(audio):
        click.echo(json.dumps(hit, ensure_ascii=False))
