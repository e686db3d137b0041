"""The retriever as a simultaneous translator calls it: a talk's glossary, top-K terms per window, a live stream.

Audio is cut into `window`-second windows every `hop` seconds (the last one ends at the end of the
audio). Each window runs through the frozen backbone and the trained audio side once; its vector is
searched in the glossary's index and the `top_k` best terms over the rejection threshold are the
window's candidates, with the glossary entry's translations and description (what the translator's
prompt needs). `--merge` instead lists the terms heard in a file: runs of consecutive windows won by
the same term (`vote`).

The glossary is the run's own (its cache) or any glossary file the run never saw (`glossary=`), embedded
with the run's text side and cached beside the run, keyed by the file's sha256 and the checkpoint's.
`Retriever.stream()` takes audio blocks of any size and gives each window as soon as it is complete,
the same windows and candidates as `retrieve` on the whole recording.

The transcript as evidence (`load(..., asr=True)`, `query --transcript`; off by default): the backbone's
own ASR transcribes each window, its fuzzy match to the glossary's forms (stage3_index/cascade.py) is
added to the audio scores exactly as eval's "ours + transcript" does (stage3_index/fusion.py), with the
weight eval's rule picks on the run's dev split, and a candidate must reach a fused threshold picked on
dev by the same rule as the audio one (`dev_picks`, cached in RUN/transcript_picks.json). Each window
then also carries its audio-only candidates and its transcript, so both are always reported.

The second stage (shared/second_stage.py), when the run has one (RUN/second.pt; `load(second=False)` to go
without): each window's first-stage top_n rows are re-scored from the tap frames the window's vector
pooled, and the threshold (picked on dev's fused scores, evaluate.dev_threshold) reads the fused scores.
The transcript as evidence still fuses with the first stage's cosines (as eval's "ours + transcript").
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from shared.atomic import atomic_path, write_json_atomic
from shared.audio import SAMPLE_RATE, read_audio
from shared.cache import FeatureCache
from shared.config import Config, config_from_dict
from shared.errors import BadInput
from shared.glossary import Glossary, load_glossary
from shared.heads import RetrievalModel, checkpoint_path, embed, load_model
from shared.termside import (TermTable, embed_glossary, embed_table, form_grams, forms_of, glossary_forms,
                             side_spec)

SEARCH_DEPTH = 3        # rows searched per wanted term: aliases are rows of their own, folded into terms
PICKS_FILE = "transcript_picks.json"   # dev's fusion weight and thresholds, beside the run
EMBED_BLOCK = 4096      # glossary rows embedded per block (LM states of one block only are in memory)
WINDOW_BATCH = 16       # windows per backbone call in offline retrieval


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


# ---------------------------------------------------------------- the glossary searched

@dataclass
class GlossaryIndex:
    """A glossary ready to search: one row per main form and alias, `owner[row]` = term id."""
    terms: list[str]                 # display form per term id
    vectors: np.ndarray              # (R, P) float32, L2-normalised
    owner: np.ndarray                # (R,) row -> term id
    entries: list[dict] = field(default_factory=list)   # glossary entry per term id ({} when unknown)
    factory: str = "Flat"
    index: object = None
    keys: list[str] = field(default_factory=list)        # main key per term id (what aliases point to)
    aliases: dict[str, str] = field(default_factory=dict)  # {alias key: main key}

    def __post_init__(self):
        self.owner = np.asarray(self.owner, dtype=np.int64)
        if not self.entries:
            self.entries = [{} for _ in self.terms]
        if not self.keys:
            self.keys = list(self.terms)
        if self.index is None:
            from stage3_index.evaluate import build_or_flat
            self.index, self.factory = build_or_flat(self.vectors, self.factory, log=lambda *_: None)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(term ids (Q, k), -1 padded; scores (Q, k)) of the k best distinct terms per query."""
        from stage3_index.evaluate import rank_terms
        ids, scores, _ = rank_terms(self.index, len(self.owner), self.owner, queries, k)
        return ids, scores

    def forms(self) -> tuple[list[str], list[int]]:
        """Every written form (main key, display text, aliases) with its term id: what the cascade matches,
        built as eval builds it from a cache's glossary.json."""
        from stage3_index.cascade import term_forms
        return term_forms(self.keys, self.aliases, self.terms)

    def candidate(self, term_id: int, score: float, with_id: bool = False) -> dict:
        """What the translator's prompt gets for one term: its form, score, translations, description
        (and with `with_id` its term id and main key, for callers joining hints to their glossary)."""
        e = self.entries[term_id]
        out = {"term": self.terms[term_id], "score": round(float(score), 4)}
        if with_id:
            out["id"], out["key"] = int(term_id), self.keys[term_id]
        tr = e.get("target_translations", e.get("translations"))
        if isinstance(tr, dict) and tr:
            out["translations"] = tr
        desc = e.get("short_description", e.get("description"))
        if isinstance(desc, str) and desc:
            out["description"] = desc
        return out


def glossary_rows(gloss: Glossary, text_field: str) -> tuple[list[str], list[str], np.ndarray]:
    """(main texts the LM part reads per term id, form text per row, owner per row): the rows stage 1
    would cache for this glossary (`glossary_forms` on the same dict extract writes)."""
    texts = gloss.texts(text_field)
    forms, owner = glossary_forms({"keys": gloss.keys, "aliases": gloss.aliases, "texts": texts,
                                   "text_field": text_field})
    return texts, forms, owner


def embed_glossary_file(model: RetrievalModel, gloss: Glossary, text_field: str, g2p: str, *,
                        text_features=None, forms_out: dict | None = None, log=print) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (R, P), owner (R,)) of a glossary the run never saw, through the run's text side.

    Blocks of EMBED_BLOCK rows: forms (spelling, eSpeak phones), n-gram ids and, when the text side has an
    LM part, `text_features(texts)` (the backbone's text tap) of the block's main terms only, so 10^6
    terms never hold all their LM states at once. `forms_out` ({}): filled with every row's forms
    ({"spell": [...], "phones": [...]}, phones by `g2p`), those the text side read: a second stage's token
    table is made from them without phonemizing the glossary twice."""
    from tqdm import tqdm
    spec = side_spec(model.text)
    uses_lm = "lm" in spec["text_encoders"]
    if uses_lm and text_features is None:
        raise ValueError("this run's text side has an LM part: pass text_features (the backbone's text tap)")
    texts, forms, owner = glossary_rows(gloss, text_field)
    vecs = np.zeros((len(forms), model.text.proj_dim), dtype=np.float32)
    t0 = time.perf_counter()
    g2p_kind = g2p if any(e == "phones" for e in spec["text_encoders"]) or forms_out is not None else "none"
    if forms_out is not None:
        forms_out.update(spell=[], phones=[] if g2p_kind != "none" else None)
    with tqdm(total=len(forms), desc="glossary", unit="row", disable=log is None, leave=False) as bar:
        for b in range(0, len(forms), EMBED_BLOCK):
            rows = np.arange(b, min(b + EMBED_BLOCK, len(forms)))
            grams = None
            if model.text.uses_forms or forms_out is not None:
                block = forms_of([forms[r] for r in rows], g2p_kind)
                if forms_out is not None:
                    forms_out["spell"] += block["spell"]
                    if forms_out["phones"] is not None:
                        forms_out["phones"] += block["phones"]
                if model.text.uses_forms:
                    grams = form_grams(block, spec["text_encoders"], spec["buckets"], spec["ngram"])
            lm, lm_index = None, np.zeros(len(rows), dtype=np.int64)
            if uses_lm:
                mains, lm_index = np.unique(owner[rows], return_inverse=True)
                lm = text_features([texts[t] for t in mains])
            vecs[rows] = embed_table(model.text, TermTable(lm, lm_index, grams))
            bar.update(len(rows))
    if log:
        secs = time.perf_counter() - t0
        log(f"embedded {len(gloss):,} terms ({len(forms):,} rows with aliases) in {secs:.1f} s "
            f"({len(forms) / max(secs, 1e-9):,.0f} rows/s)")
    return vecs, owner


def file_sha256(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(b"\x00" if p is None else Path(p).read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- loading a run

def _resolve_model_path(path: str, anchors: list[Path]) -> str:
    """A relative model path in a run's config is relative to where the pipeline ran, an ancestor of the
    run's feature cache (e.g. cache/models/... beside cache/features/...): found from any directory."""
    if not path or Path(path).is_absolute() or Path(path).exists():
        return path
    for a in anchors:
        if (a / path).exists():
            return str(a / path)
    return path


def _backbone_spec(cfg: Config, features: Path):
    from stage1_extract.backbones import BackboneSpec
    spec = BackboneSpec.from_any(cfg.backbone).resolved()
    anchors = list(features.resolve().parents)
    spec.audio_model = _resolve_model_path(spec.audio_model, anchors)
    spec.text_model = _resolve_model_path(spec.text_model, anchors)
    return spec


@dataclass
class TranscriptEvidence:
    """The transcript as evidence: an ASR (`.transcribe(list of float32 16 kHz arrays) -> texts`), the
    cascade's matcher over the searched glossary's forms, and what dev picked: the fusion weight and the
    threshold a fused score must reach. `picked` says where they came from."""
    asr: object
    matcher: object
    weight: float
    threshold: float
    picked: dict = field(default_factory=dict)

    # The only two calls the Retriever makes into the ASR and the cascade: a decoding mode or a fuzzy
    # scorer is switched in `backbone_asr` / stage3_index/cascade.py, never here.
    def transcribe(self, waves: list[np.ndarray]) -> list[str]:
        return self.asr.transcribe([np.ascontiguousarray(w, dtype=np.float32) for w in waves])

    def term_scores(self, transcript: str) -> np.ndarray:
        return self.matcher.term_scores(transcript)


def backbone_asr(cfg: Config, features: str | Path | None = None):
    """The backbone's own ASR for windows, as `make transcripts` decoded dev's chunks in `features` (the run's
    own cache, whose dev transcripts' fuzzy scores picked the weight and thresholds): the one place the
    decoding is chosen (stage1_extract.transcribe.load_asr)."""
    from stage1_extract.transcribe import load_asr
    return load_asr(cfg, features)


@dataclass
class Retriever:
    backbone: object
    model: RetrievalModel
    glossary: GlossaryIndex
    threshold: float
    window: float = 1.92
    hop: float = 0.96
    min_votes: int = 1
    evidence: TranscriptEvidence | None = None       # the transcript as evidence; None = audio only
    config: Config | None = None                     # the run's saved config (load sets it)
    features: Path | None = None                     # the run's own feature cache (load sets it)
    reranker: object = None                          # the run's second stage (shared/second_stage.Reranker)
    token_table: dict | None = None                  # its token ids of the searched glossary's rows

    @classmethod
    def load(cls, run: str | Path, *, glossary: str | Path | None = None, alt2main: str | Path | None = None,
             backbone=None, threshold: float | None = None, asr=None, fused_threshold: float | None = None,
             second: bool = True, log=print) -> "Retriever":
        """The run's model and backbone; `glossary` (any format `prepare` reads, with its `alt2main`) is
        searched instead of the run's own, embedded once and cached in RUN/glossaries/.

        asr: None/False = audio only; True = the backbone's own ASR (`backbone_asr`); or any object with
        `.transcribe(waves) -> texts`. The transcript is then fused with dev's weight and thresholded at
        dev's fused threshold (`fused_threshold` to change it); when the run's dev split has no cached
        transcripts nothing can be picked: it says so and stays audio only.

        second: when the run has a second stage (RUN/second.pt), each window's first-stage top_n rows are
        re-scored by it and the threshold (picked on dev's fused scores) reads its scores; False = the first
        stage alone."""
        run = Path(run)
        ckpt_path = checkpoint_path(run)
        model, ckpt = load_model(ckpt_path)
        cfg = config_from_dict(ckpt["config"])
        from stage3_index.evaluate import resolve_features
        features = resolve_features(ckpt["spec"]["features"], run)
        if backbone is None:
            from stage1_extract.backbones import load_backbone
            backbone = load_backbone(_backbone_spec(cfg, features))
        from shared.second_stage import Reranker
        reranker = Reranker.load(run) if second else None
        forms = None
        if glossary is None:
            index = _run_glossary(model, FeatureCache(features), cfg)
            if reranker is not None:
                from stage3_index.second_eval import _forms
                forms = _forms(FeatureCache(features), "glossary")
        else:
            index, forms = _file_glossary(run, ckpt_path, model, cfg, glossary, alt2main, backbone, log,
                                          forms=reranker is not None)
        if threshold is None:
            threshold = _threshold_of(run, model, FeatureCache(features), cfg.eval.keep_hits, reranker)
        evidence = None
        if asr is not None and asr is not False:
            picks = dev_picks(run, model, FeatureCache(features), cfg, log=log)
            if picks is None:
                log("the transcript as evidence is off: the run's dev split has no transcripts to pick its weight "
                    "and threshold on (make them with `python -m stage1_extract transcribe --split dev`)")
            else:
                from stage3_index.cascade import CascadeMatcher
                asr_model = backbone_asr(cfg, features) if asr is True else asr
                evidence = TranscriptEvidence(
                    asr_model, CascadeMatcher(*index.forms()), picks["weight"],
                    picks["fused_threshold"] if fused_threshold is None else float(fused_threshold), picks)
        return cls(backbone, model, index, threshold, cfg.eval.window, cfg.eval.hop, cfg.eval.min_votes,
                   evidence, cfg, Path(features), reranker,
                   None if reranker is None else reranker.token_table(forms))

    # ---- scoring

    def window_vectors(self, waves: list[np.ndarray]) -> np.ndarray:
        """(W, P) audio-side vectors of windows."""
        return self._window_taps(waves)[0]

    def _window_taps(self, waves: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """(W, P) audio-side vectors of windows and the backbone's tap states they pool (the second stage's
        frames are read from these)."""
        if not waves:
            return np.zeros((0, self.model.audio.proj_dim), dtype=np.float32), []
        items = self.backbone.audio_features(waves)
        return embed(self.model.audio, items), items

    def rank(self, vecs: np.ndarray, items: list, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(term ids (W, k) -1 padded, scores (W, k)) per window: the first stage's search, or with a second
        stage its top_n rows re-scored and re-ordered (the fused scores the threshold reads)."""
        if self.reranker is None or not len(vecs):
            return self.glossary.search(vecs, k)
        from shared.second_stage import tower_frames
        from shared.termside import rows_to_terms
        from stage3_index.evaluate import search_blocks
        from stage3_index.second_eval import rescored
        n_rows = len(self.glossary.owner)
        first, rows, _ = search_blocks(self.glossary.index, vecs,
                                       max(1, min(max(SEARCH_DEPTH * k, self.reranker.top_n), n_rows)))
        rows, scores = rescored(self.reranker, tower_frames(self.model.audio, items), rows, first, self.token_table)
        return rows_to_terms(rows, scores, self.glossary.owner, k)

    def _candidates(self, ids, scores, threshold: float, with_id: bool) -> list[dict]:
        return [self.glossary.candidate(int(t), sc, with_id) for t, sc in zip(ids, scores)
                if t >= 0 and sc >= threshold]

    def fused(self, vecs: np.ndarray, transcripts: list[str], top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(term ids, fused scores) (W, top_k): our best terms and the transcript's, as eval's fusion ranks
        them (our FUSION_DEPTH best plus the cascade's ten, audio cosine + weight * fuzzy score)."""
        from stage3_index.evaluate import FUSION_DEPTH
        from stage3_index.fusion import fuse
        ev = self.evidence
        depth = max(top_k, min(FUSION_DEPTH, len(self.glossary.terms)))
        ids, scores = self.glossary.search(vecs, depth)
        fuzzy = [ev.term_scores(t) for t in transcripts]
        return fuse(ids, scores, vecs, self.glossary.vectors, self.glossary.owner, fuzzy, ev.weight, top_k)

    def _windows(self, spans: list[tuple[int, int]], waves: list[np.ndarray], top_k: int,
                 with_id: bool = False) -> list[dict]:
        """Per window: times and the candidates over the threshold, best first; with the transcript as
        evidence, the fused candidates, the audio-only ones beside them and the transcript."""
        vecs, items = self._window_taps(waves)
        ids, scores = self.rank(vecs, items, top_k)
        out = [{"start": round(s / SAMPLE_RATE, 3), "end": round(e / SAMPLE_RATE, 3),
                "candidates": self._candidates(i, sc, self.threshold, with_id)}
               for (s, e), i, sc in zip(spans, ids, scores)]
        if self.evidence is not None and out:
            said = self.evidence.transcribe(waves)
            f_ids, f_scores = self.fused(vecs, said, top_k)
            for w, text, i, sc in zip(out, said, f_ids, f_scores):
                w["audio_candidates"] = w["candidates"]
                w["candidates"] = self._candidates(i, sc, self.evidence.threshold, with_id)
                w["transcript"] = text
        return out

    def retrieve(self, audio: str | Path | np.ndarray, top_k: int | None = None) -> list[dict]:
        """With `top_k`: every window's `{start, end, candidates: [{term, score, translations?,
        description?}]}` (at most top_k over the threshold; with the transcript as evidence also
        `audio_candidates` and `transcript`). Without: the terms heard, merged over consecutive windows
        (`[{term, score, start, end}]`)."""
        wav = audio if isinstance(audio, np.ndarray) else read_audio(audio, allow_silent=True)
        spans = windows(len(wav), self.window, self.hop)
        results = []
        for b in range(0, len(spans), WINDOW_BATCH):
            part = spans[b:b + WINDOW_BATCH]
            results += self._windows(part, [wav[s:e] for s, e in part], top_k or 1)
        return results if top_k else merge_windows(results, self.min_votes)

    def stream(self, top_k: int = 5, *, batch: int = 1, with_id: bool = False) -> "Stream":
        """A live stream: `push(samples)` blocks of any size at 16 kHz, `flush()` at the end.

        batch: windows completed by one push run through the backbone (and ASR) together, up to this many
        (1 = each is given as soon as it is ready; more is faster offline, same windows and candidates).
        with_id: each candidate also carries its term `id` and main `key`."""
        return Stream(self, top_k, batch=batch, with_id=with_id)


def merge_windows(results: list[dict], min_votes: int = 1) -> list[dict]:
    """The terms heard: runs of consecutive windows whose best candidate is the same term."""
    spans = [(r["start"], r["end"]) for r in results]
    tops = [r["candidates"][0] if r["candidates"] else None for r in results]
    ids = {n: i for i, n in enumerate(dict.fromkeys(c["term"] for c in tops if c))}
    best = [(ids[c["term"]], c["score"]) if c else (-1, 0.0) for c in tops]
    found = vote(spans, best, -np.inf, min_votes)   # candidates are already over the threshold
    by_id = {i: n for n, i in ids.items()}
    return [{"term": by_id[t], "score": round(sc, 4), "start": round(s, 2), "end": round(e, 2)}
            for t, sc, s, e in found]


class Stream:
    """Windows of a live recording, each given as soon as its last sample arrives.

    The windows are those `windows()` cuts from the whole recording: starts 0, hop, 2 hop... while a
    window fits; at `flush()`, one more ending at the end when the last one did not (or the only,
    shorter one when the recording is shorter than a window). Only the samples later windows need are
    kept, so memory does not grow with the talk's length."""

    def __init__(self, retriever: Retriever, top_k: int = 5, *, batch: int = 1, with_id: bool = False):
        self.r, self.top_k, self.batch, self.with_id = retriever, top_k, max(1, int(batch)), with_id
        self.w = int(round(retriever.window * SAMPLE_RATE))
        self.h = int(round(retriever.hop * SAMPLE_RATE))
        self._reset()

    def _reset(self):
        self.buf = np.zeros(0, dtype=np.float32)
        self.buf_start = 0          # sample index of buf[0] in the recording
        self.n = 0                  # samples received
        self.next_start = 0         # start of the next window to give
        self.given = 0              # windows given

    def _run(self, spans: list[tuple[int, int]]) -> list[dict]:
        waves = [self.buf[s - self.buf_start:e - self.buf_start] for s, e in spans]
        return self.r._windows(spans, waves, self.top_k, self.with_id)

    def push(self, samples: np.ndarray) -> list[dict]:
        """Add samples (float32 mono 16 kHz, any block size); the windows completed by them."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.buf = np.concatenate([self.buf, samples])
        self.n += len(samples)
        spans = []
        while self.next_start + self.w <= self.n:
            spans.append((self.next_start, self.next_start + self.w))
            self.next_start += self.h
        out = []
        for b in range(0, len(spans), self.batch):   # batch 1: each window given as soon as it is ready
            out += self._run(spans[b:b + self.batch])
        self.given += len(spans)
        # keep what the next window, or the end-aligned last one, still needs
        keep_from = max(0, min(self.next_start, self.n - self.w))
        if keep_from > self.buf_start:
            self.buf = self.buf[keep_from - self.buf_start:]
            self.buf_start = keep_from
        return out

    def flush(self) -> list[dict]:
        """The end of the recording: the last window (ending at the end) if not given yet; resets."""
        out = []
        if self.n and not self.given:
            out = self._run([(0, self.n)])
        elif self.given and self.next_start - self.h + self.w < self.n:
            out = self._run([(self.n - self.w, self.n)])
        self._reset()
        return out


def _run_glossary(model, cache: FeatureCache, cfg: Config) -> GlossaryIndex:
    """The run's own glossary from its cache; entries (translations) from the glossary file when it
    is still where extraction read it."""
    g = cache.read_json("glossary.json")
    vecs, owner = embed_glossary(model, cache)
    terms = g["texts"] if g.get("text_field") == "term" else g["keys"]
    entries = []
    src = g.get("source")
    if src and Path(src).is_file():
        try:
            gl = load_glossary(src, log=None)
            entries = [gl.entries.get(k, {}) for k in g["keys"]]
        except BadInput:
            entries = []
    return GlossaryIndex(terms, vecs, owner, entries, cfg.eval.index, keys=list(g["keys"]),
                         aliases=dict(g.get("aliases", {})))


def _file_glossary(run: Path, ckpt_path: Path, model, cfg: Config, path, alt2main, backbone, log,
                   forms: bool = False) -> tuple[GlossaryIndex, dict | None]:
    """A glossary file through the run's text side, cached in RUN/glossaries/ (sha256 of the glossary
    and alias files + the checkpoint's): the second load of the same talk glossary is instant. With
    `forms`, also its rows' forms (spelling, phones: what a second stage's token table reads), cached
    beside the vectors (KEY.forms.json: phonemizing 10^5 rows takes a while)."""
    gloss = load_glossary(path, alt2main or None, log=log)
    key = f"{file_sha256(path, alt2main)[:16]}-{file_sha256(ckpt_path)[:12]}-{cfg.data.text_field}"
    cached = run / "glossaries" / f"{key}.npz"
    vecs = owner = None
    if cached.is_file():
        try:
            with np.load(cached) as z:
                vecs, owner = z["vectors"], z["owner"]
        except (OSError, ValueError, KeyError):
            vecs = None        # torn by a killed run: embed again
    if vecs is None or len(owner) != len(glossary_rows(gloss, cfg.data.text_field)[2]):
        text_features = getattr(backbone, "text_features", None) if "lm" in side_spec(model.text)["text_encoders"] \
            else None
        made = {} if forms else None
        vecs, owner = embed_glossary_file(model, gloss, cfg.data.text_field, cfg.text.g2p,
                                          text_features=text_features, forms_out=made, log=log)
        if made is not None:
            write_json_atomic(cached.with_suffix(".forms.json"), made)
        with atomic_path(cached) as tmp:
            np.savez(tmp, vectors=vecs, owner=owner)
        write_json_atomic(cached.with_suffix(".json"), {
            "glossary": str(Path(path).resolve()), "alt2main": str(Path(alt2main).resolve()) if alt2main else None,
            "checkpoint": str(ckpt_path.resolve()), "terms": len(gloss), "rows": len(owner)})
    elif log:
        log(f"glossary {path}: {len(gloss):,} terms, embeddings reused from {cached}")
    row_forms = None
    if forms:
        fpath = cached.with_suffix(".forms.json")
        try:
            row_forms = json.loads(fpath.read_text(encoding="utf-8"))
            if len(row_forms["spell"]) != len(owner):
                row_forms = None
        except (OSError, ValueError, KeyError):
            row_forms = None
        if row_forms is None:
            row_forms = forms_of(glossary_rows(gloss, cfg.data.text_field)[1], cfg.text.g2p)
            write_json_atomic(fpath, row_forms)
    terms = [gloss.entries[k].get("term") or k for k in gloss.keys]
    return GlossaryIndex(terms, vecs, owner, [gloss.entries[k] for k in gloss.keys], cfg.eval.index,
                         keys=list(gloss.keys), aliases=dict(gloss.aliases)), row_forms


def _threshold_of(run: Path, model, cache, keep_hits: float, reranker=None) -> float:
    """The dev-picked threshold from the run's report (when that report ranked with the same stage: the
    second stage's fused scores or the first stage's cosines), or picked now on dev by eval's rule."""
    rep = run / "eval" / "test" / "report.json"
    if rep.is_file():
        got = json.loads(rep.read_text())
        t = got["rejection"]["threshold"]
        if t is not None and bool(got.get("second_stage", False)) == (reranker is not None):
            return float(t)
    from stage3_index.evaluate import dev_threshold
    t = dev_threshold(model, cache, keep_hits, "Flat", log=lambda *_: None, reranker=reranker)
    return 0.0 if t is None else t


def dev_picks(run: Path, model, cache: FeatureCache, cfg: Config, log=print) -> dict | None:
    """What the transcript as evidence needs, picked on the dev split of the run's own cache (its chunks
    and their cached transcripts), never on what is evaluated; None when dev has no transcripts.

    - weight: eval's rule (`fusion.pick_weight` over `eval.fusion_weights`, best mean R@1/5/10 of the
      fused ranking on dev; ties to the smaller), so it equals the weight eval reports for "ours +
      transcript" (a differing eval report is said);
    - fused_threshold: the fused score keeping `eval.keep_hits` of dev's fused top-1 hits, the audio
      threshold's rule;
    - cascade_threshold: the same rule on the cascade's top-1 fuzzy scores, with eval's cascade scorer
      (`eval.cascade_scorer`; the talk evaluation's cascade).
    When dev's transcripts cover a fixed subset (`extract.asr_every`), all three are picked on its chunks.

    Cached in RUN/transcript_picks.json, keyed by the checkpoint, dev's transcripts and those settings."""
    from stage3_index.evaluate import _fused_ranking, build_or_flat, read_transcripts, transcripts_subset
    from stage3_index.fusion import pick_weight
    from shared.metrics import pick_threshold, query_hits
    from stage2_train.data import SplitData
    tpath = cache.root / "transcripts" / "dev.jsonl"
    if "audio/dev" not in cache.tables or not tpath.is_file():
        return None
    ks = sorted(set(int(k) for k in cfg.eval.ks))
    weights = sorted(set(float(w) for w in cfg.eval.fusion_weights)) or [0.0]
    from stage3_index.cascade import DEFAULT_SCORER, CascadeMatcher, rank_all, term_forms
    scorer = getattr(cfg.eval, "cascade_scorer", None) or DEFAULT_SCORER
    key = {"checkpoint_sha256": file_sha256(checkpoint_path(run)), "dev_transcripts_sha256": file_sha256(tpath),
           "fusion_weights": weights, "keep_hits": cfg.eval.keep_hits, "ks": ks, "cascade_scorer": scorer}
    path = run / PICKS_FILE
    if path.is_file():
        try:
            got = json.loads(path.read_text())
            if got.get("key") == key:
                return got
        except (OSError, json.JSONDecodeError):
            pass        # torn by a killed run: pick again
    t0 = time.perf_counter()
    vecs, owner = embed_glossary(model, cache)
    index, _ = build_or_flat(np.ascontiguousarray(vecs, dtype=np.float32), "Flat", log=lambda *_: None)
    dev = SplitData(cache, "dev")
    gold = dev.terms[:len(dev)]
    audio = embed(model.audio, dev.audio.items(range(len(dev))))
    ranked = _fused_ranking(cache, "dev", dev, audio, index, vecs, np.asarray(owner, np.int64), max(ks))
    rows = transcripts_subset(cache, "dev", dev)   # dev transcribed one chunk in k (extract.asr_every): those only
    if rows is not None:
        gold, every_row = [gold[n] for n in rows], ranked
        ranked = lambda w: tuple(a[rows] for a in every_row(w))  # noqa: E731

    def on_dev(w):
        ids, _ = ranked(w)
        _, _, h = query_hits(ids, gold, ks)
        return {str(k): float(h[:, i].mean()) for i, k in enumerate(ks)}

    def top1_threshold(ids, scores):
        chunk, _, hits = query_hits(ids, gold, (1,))
        right = np.zeros(len(gold), dtype=bool)
        right[chunk[hits[:, 0]]] = True
        return pick_threshold(scores[right, 0], cfg.eval.keep_hits) if right.any() else None

    weight, tried = pick_weight(on_dev, weights)
    fused_threshold = top1_threshold(*ranked(weight))
    g = cache.read_json("glossary.json")
    texts = g["texts"] if g.get("text_field", "term") == "term" else None
    matcher = CascadeMatcher(*term_forms(g["keys"], g.get("aliases", {}), texts), scorer)
    said = read_transcripts(cache, "dev")
    c_ids, c_scores = rank_all([said.get(str(i), "") for i in dev.ids[:len(dev)]], [], [], max(ks), matcher=matcher)
    if rows is not None:
        c_ids, c_scores = c_ids[rows], c_scores[rows]
    cascade_threshold = top1_threshold(c_ids, c_scores)
    if fused_threshold is None:
        log("dev has no fused top-1 hit: the transcript as evidence cannot be thresholded")
        return None
    picks = {"key": key, "weight": weight, "fused_threshold": fused_threshold,
             "cascade_threshold": cascade_threshold, "cascade_scorer": scorer, "dev_chunks": len(gold),
             "dev_mean_recall_by_weight": {str(w): round(float(np.mean(list(v.values()))), 4)
                                           for w, v in tried.items()},
             "how": f"on the dev split of {cache.root}: weight by eval's rule (best mean R@{'/'.join(map(str, ks))} "
                    f"of the fused ranking), thresholds keep {cfg.eval.keep_hits} of dev's top-1 hits"}
    write_json_atomic(path, picks)
    rep = run / "eval" / "test" / "report.json"
    if rep.is_file():
        try:
            reported = (json.loads(rep.read_text()).get("fused") or {}).get("weight")
        except (OSError, json.JSONDecodeError):
            reported = None
        if reported is not None and float(reported) != weight:
            log(f"note: dev picks fusion weight {weight} but {rep} reports {reported} (another checkpoint or "
                "settings?)")
    log(f"transcript as evidence, picked on dev ({len(gold)} chunks, {time.perf_counter() - t0:.1f} s): weight "
        f"{weight}, fused threshold {fused_threshold:.3f}, cascade threshold "
        f"{'none' if cascade_threshold is None else f'{cascade_threshold:.3f}'}")
    return picks


# ---------------------------------------------------------------- command line

def read_talk(path: str, log) -> np.ndarray:
    """A recording as float32 16 kHz mono; other rates and channel counts are converted, and said so."""
    import soundfile as sf
    from shared.audio import audio_info
    sr, _ = audio_info(path)
    channels = sf.info(path).channels
    if sr != SAMPLE_RATE or channels != 1:
        log(f"{path}: {sr} Hz, {channels} channel(s): mixed down to mono and resampled to {SAMPLE_RATE} Hz")
    return read_audio(path, allow_silent=True)


def pcm_blocks(stream, block_samples: int):
    """float32 blocks of raw 16-bit little-endian mono PCM read from a binary stream until EOF."""
    carry = b""
    while True:
        data = stream.read(2 * block_samples)
        if not data:
            break
        data = carry + data
        cut = len(data) - len(data) % 2
        carry = data[cut:]
        if cut:
            yield np.frombuffer(data[:cut], dtype="<i2").astype(np.float32) / 32768.0


@click.command("query")
@click.option("--run", required=True, type=click.Path(file_okay=False), help="Run folder (cache/runs/RUN).")
@click.option("--audio", required=True,
              help="WAV/FLAC file to scan (other rates/channels are converted), or - for raw 16 kHz mono "
                   "16-bit little-endian PCM on stdin (a live stream: each window printed when complete).")
@click.option("--glossary", type=click.Path(dir_okay=False), default=None,
              help="The talk's glossary (the seed's dict JSON, a JSON list, or one term per line). "
                   "[the run's training glossary]")
@click.option("--alt2main", type=click.Path(dir_okay=False), default=None, help="Its alias map {alias: main}.")
@click.option("--top-k", "top_k", type=int, default=5, show_default=True,
              help="Candidates per window (those over the threshold, best first).")
@click.option("--merge", is_flag=True, help="Instead of windows, list the terms heard (runs of windows "
                                            "won by the same term), with times.")
@click.option("--threshold", type=float, default=None,
              help="Score a candidate must reach (with --transcript: the fused score). [the dev-picked "
                   "threshold of the run's eval; with --transcript the fused one picked on dev]")
@click.option("--transcript", is_flag=True,
              help="The transcript as evidence: the backbone's own ASR per window, fuzzy-matched to the glossary, "
                   "added to the audio scores with the weight picked on dev (as eval's 'ours + transcript'). Each "
                   "window then also gives its audio-only candidates (audio_candidates) and its transcript.")
@click.option("--block-ms", type=int, default=100, show_default=True, help="Read size for --audio -.")
def query_command(run, audio, glossary, alt2main, top_k, merge, threshold, transcript, block_ms):
    """Slide windows over AUDIO; print each window's glossary candidates (JSON lines), or with --merge the
    terms heard with times."""
    if top_k < 1:
        raise BadInput(f"--top-k {top_k}", fix="give 1 or more")
    err = lambda m: click.echo(m, err=True)  # noqa: E731 (stdout is the JSON lines)
    r = Retriever.load(run, glossary=glossary, alt2main=alt2main, threshold=None if transcript else threshold,
                       asr=True if transcript else None, fused_threshold=threshold if transcript else None, log=err)

    def emit(items):
        for item in items:
            click.echo(json.dumps(item, ensure_ascii=False))
        sys.stdout.flush()

    t0 = time.perf_counter()
    if audio == "-":
        stream, results = r.stream(1 if merge else top_k), []
        for block in pcm_blocks(sys.stdin.buffer, max(1, block_ms * SAMPLE_RATE // 1000)):
            got = stream.push(block)
            results += got
            if not merge:
                emit(got)
        got = stream.flush()
        results += got
        emit(merge_windows(results, r.min_votes) if merge else got)
        n = len(results)
    else:
        wav = read_talk(audio, err)
        out = r.retrieve(wav, top_k=None if merge else top_k)
        emit(out)
        n = len(windows(len(wav), r.window, r.hop))
    fused = "" if r.evidence is None else \
        f", transcript weight {r.evidence.weight} fused threshold {r.evidence.threshold:.3f}"
    err(f"{n} windows in {time.perf_counter() - t0:.1f} s, glossary {len(r.glossary.terms):,} terms, "
        f"threshold {r.threshold:.3f}{fused}")
