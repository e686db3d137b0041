"""`eval`: a run's glossary index, Recall@K (seen/unseen, glossary sizes), rejection, speed, and the
cascade baseline beside it; reports.

Everything is computed from the run's checkpoint and cached features: the frozen backbone is not
loaded. The evaluated split may be one of the run's own feature cache (report in `RUN/eval/SPLIT/`)
or of another cache, another corpus with its own glossary, built with the same backbone
(`--features`; report in `RUN/eval/CACHENAME.SPLIT/`). What the report's keys mean: README, eval.

- Seen / unseen: a query's term is *seen* when the run trained on a chunk holding it: the first
  `train.limit` (0 = all) chunks of the train split of the run's own cache (the same chunks mining's
  mine_from="train" takes its terms from). Terms are compared by their normalised key, so this holds
  across corpora. *Strictly unseen*: unseen, and no word of any of the term's forms (main term,
  aliases) is a word of those chunks' transcripts ("tesla" is unseen but not strictly after
  "nikola tesla" was trained).
- Rejection threshold and the fusion weight of "ours + transcript": always picked on the dev split of
  the run's own cache (never on the evaluated split); null, with a note, when that dev cannot pick
  them or when dev itself is evaluated.
- Glossary sizes: the split's own terms padded with real distractor names (`text/distractors`,
  made by stage 1) up to each `eval.glossary_sizes`, without the names that clash with the evaluated
  corpus (shared/distractors.clashes: word-level containment with a glossary form, or spoken in its
  transcripts); each row uses the main index kind, rows are keyed by their real size.
- Baseline: the cascade (ASR transcript + fuzzy match of every term form, stage3_index/cascade.py),
  on the same queries, when stage 1 cached transcripts for the split.

Where the run's feature cache is: checkpoints store its absolute path (stage 2 resolves it at save
time). Older checkpoints stored it as given, relative to the working directory of training; such a
path is tried relative to the current directory, then relative to each parent of the run folder
(`cache/runs/demo` -> `cache/features/demo` from any working directory).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.atomic import write_json_atomic
from shared.cache import FeatureCache, file_sha256, fingerprint_diff
from shared.cli import figures
from shared.config import Config, config_from_dict, load_config
from shared.distractors import clashes
from shared.errors import BadInput
from shared.glossary import normalize
from shared.heads import checkpoint_path, embed, load_model
from shared.termside import embed_glossary, embed_text_table, glossary_forms, rows_to_terms
from stage2_train.data import SplitData
from shared.index import build_index, load_index_if, save_index, search
from shared.metrics import auroc, false_alarm_rate, pick_threshold, query_hits, recall_at_threshold

# What makes two caches' features comparable: same models and weights, taps, text field, features.
BACKBONE_KEYS = ("backbone", "text_field", "feature_settings", "dtype", "cache_version")
SEARCH_BLOCK = 4096      # queries per FAISS call: memory stays (block x depth), never chunks x glossary


# ---------------------------------------------------------------- the run and its caches

def resolve_features(path: str | Path, run: str | Path) -> Path:
    """The run's feature cache folder from a checkpoint's spec["features"] (see the module docstring)."""
    p = Path(path)
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p] + [parent / p for parent in Path(run).resolve().parents]
    for c in candidates:
        if (c / "index.json").is_file():
            return c
    raise BadInput(f"the run's feature cache {str(path)!r} is not found (tried {', '.join(map(str, candidates[:4]))}"
                   + (", ..." if len(candidates) > 4 else "") + ")", file=run,
                   fix="run from the folder training ran in, or restore the cache")


def backbone_part(cache: FeatureCache) -> dict:
    """The part of a cache's fingerprint that decides whether its features mean the same thing."""
    part = {k: cache.fingerprint.get(k) for k in BACKBONE_KEYS}
    part["backbone_fingerprint"] = cache.index.get("backbone_fingerprint")
    part["dims"] = cache.index.get("dims")
    return json.loads(json.dumps(part, default=str))


def check_same_backbone(own: FeatureCache, other: FeatureCache) -> None:
    diff = fingerprint_diff(backbone_part(own), backbone_part(other))
    if diff:
        keys = [d.split(":")[0] for d in diff]
        raise BadInput(f"this cache was made with another backbone than the run's ({', '.join(keys)}): "
                       + "; ".join(d.replace("cache has", "run's cache has").replace("config gives", "this cache has")
                                   for d in diff),
                       file=other.root, fix="extract that corpus with the run's backbone settings and weights")


def load_run(run: str | Path):
    """(model, checkpoint dict, the run's Config, the run's FeatureCache, checkpoint path)."""
    run = Path(run)
    ckpt_path = checkpoint_path(run)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    root = resolve_features(ckpt["spec"]["features"], run)
    cache = FeatureCache(root)
    diff = fingerprint_diff(cache.fingerprint, ckpt["cache_fingerprint"])  # "cache has X, config (the run) gives Y"
    if diff:  # checked before the model is rebuilt from that cache's exported top layers
        raise BadInput("the feature cache changed since this run was trained: " + "; ".join(diff),
                       file=cache.root, fix="evaluate with the cache the run was trained on")
    model, ckpt = load_model(ckpt, root)
    return model, ckpt, config_from_dict(ckpt["config"]), cache, ckpt_path


def trained_keys(cache: FeatureCache, limit: int) -> set[str]:
    """Normalised keys of the terms in the chunks the run trained on (`train.limit` included)."""
    if "audio/train" not in cache.tables:
        return set()
    data = SplitData(cache, "train", in_memory="no", limit=limit)
    keys = cache.read_json("glossary.json")["keys"]
    return {normalize(keys[t]) for t in data.used_terms()}


def kept_distractors(model, own: FeatureCache, cache: FeatureCache):
    """The distractor names that are real negatives for `cache`'s corpus, or None when there are none:
    (the cache they come from (another corpus borrows the run's: same backbone, same features), kept
    indices into its distractors.json, kept names, their vectors, {"glossary", "spoken"} counts dropped).
    Only real negatives: names clashing with a glossary form or spoken in the corpus are dropped
    (shared/distractors.py: why here and not in stage 1)."""
    dist_cache = cache if "text/distractors" in cache.tables else own
    if "text/distractors" not in dist_cache.tables:
        return None
    names = dist_cache.read_json("distractors.json")
    in_gloss, spoken = clashes(names, glossary_forms(cache.read_json("glossary.json"))[0],
                               cache.read_json("chunk_texts.json"))
    ok = np.flatnonzero(~(in_gloss | spoken))
    vecs = np.ascontiguousarray(embed_text_table(model, dist_cache, "distractors")[ok], dtype=np.float32)
    dropped = {"glossary": int(in_gloss.sum()), "spoken": int((spoken & ~in_gloss).sum())}
    return dist_cache, ok, [names[i] for i in ok], vecs, dropped


def trained_words(cache: FeatureCache, limit: int) -> set[str]:
    """Every normalised word spoken in the transcripts (term_chunk_text) of the chunks the run trained on."""
    if "audio/train" not in cache.tables:
        return set()
    data = SplitData(cache, "train", in_memory="no", limit=limit)
    return {w for text in data.used_texts() for w in normalize(text).split()}


def strictly_unseen_terms(glossary: dict, train_keys: set[str], train_words: set[str]) -> np.ndarray:
    """(n_terms,) bool: the term is unseen by key and no word of any of its forms (main term, display
    text, aliases) was spoken in a trained chunk. "tesla" is unseen by key after training on "nikola
    tesla" chunks, but not strictly: the model heard the word."""
    from stage3_index.cascade import term_forms
    keys = glossary["keys"]
    texts = glossary.get("texts") if glossary.get("text_field", "term") == "term" else None
    forms, owner = term_forms(keys, glossary.get("aliases", {}), texts)
    out = np.array([normalize(k) not in train_keys for k in keys], dtype=bool)
    for form, t in zip(forms, owner):
        if out[t] and any(w in train_words for w in form.split()):
            out[t] = False
    return out


# ---------------------------------------------------------------- search

def search_blocks(index, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(scores, ids, seconds) of the top `depth` rows per query, SEARCH_BLOCK queries at a time."""
    scores, ids, secs = [], [], 0.0
    for b in range(0, len(queries), SEARCH_BLOCK):
        t0 = time.perf_counter()
        s, i = search(index, queries[b:b + SEARCH_BLOCK], depth)
        secs += time.perf_counter() - t0
        scores.append(s)
        ids.append(i)
    if not scores:
        return np.zeros((0, depth), np.float32), np.zeros((0, depth), np.int64), 0.0
    return np.concatenate(scores), np.concatenate(ids), secs


def rank_terms(index, n_rows: int, owner: np.ndarray, audio: np.ndarray, k: int):
    """(term ids (C, k) -1 padded, scores (C, k), search seconds): rows searched 3x deeper, folded."""
    depth = max(1, min(3 * k, n_rows))
    s, r, secs = search_blocks(index, audio, depth)
    ids, scores = rows_to_terms(r, s, owner, k)
    return ids, scores, secs


def build_or_flat(vecs: np.ndarray, factory: str, log=print):
    """The configured index kind; Flat (with a message) when the vectors are too few to train it."""
    try:
        return build_index(vecs, factory), factory
    except BadInput as e:
        if "needs at least" not in str(e):
            raise
        log(f"{len(vecs)} rows are too few for index {factory!r}: Flat for this one")
        return build_index(vecs, "Flat"), "Flat"


# ---------------------------------------------------------------- metrics of one ranking

class SeenTerms:
    """Which of a glossary's terms the run trained on: `seen(t)` by normalised key (README: seen /
    unseen), `strict_unseen(t)` unseen by key and no word of the term heard in training either."""

    def __init__(self, keys, train_keys: set[str], strict_unseen: np.ndarray | None = None):
        self.seen = np.array([normalize(k) in train_keys for k in keys], dtype=bool)
        self.strict = np.zeros(len(keys), dtype=bool) if strict_unseen is None else np.asarray(strict_unseen, bool)

    def __call__(self, t: int) -> bool:
        return 0 <= t < len(self.seen) and bool(self.seen[t])

    def strict_unseen(self, t: int) -> bool:
        return 0 <= t < len(self.strict) and bool(self.strict[t])


def score_ranking(ids: np.ndarray, scores: np.ndarray, gold: list, seen_term, ks) -> dict:
    """Recall (all / seen / unseen, and strictly unseen when `seen_term` is a SeenTerms), both AUROCs
    and what the threshold figures need.

    seen_term(term id) -> bool. A chunk's rejection score is its top-1 score.
    """
    chunk, term, hits = query_hits(ids, gold, ks)
    seen = np.array([seen_term(int(t)) for t in term], dtype=bool)
    strict_of = getattr(seen_term, "strict_unseen", None)
    strict = np.array([strict_of(int(t)) for t in term], dtype=bool) if strict_of else None

    def rec(mask):
        return {str(k): (float(hits[mask, i].mean()) if mask.any() else None) for i, k in enumerate(ks)}

    max_score = np.asarray(scores[:, 0], dtype=np.float64) if len(scores) else np.zeros(0)
    term_chunk = np.array([bool(g) for g in gold], dtype=bool)
    top1_right = np.zeros(len(gold), dtype=bool)
    top1_right[chunk[hits[:, 0]]] = True
    out = {"recall": rec(np.ones(len(term), dtype=bool)), "recall_seen": rec(seen), "recall_unseen": rec(~seen),
           "auroc": _num(auroc(max_score[term_chunk], max_score[~term_chunk])),
           "auroc_top1_correct": _num(auroc(max_score[term_chunk & top1_right], max_score[~term_chunk])),
           "_chunk": chunk, "_term": term, "_hits": hits, "_seen": seen, "_max": max_score,
           "_term_chunk": term_chunk, "_top1_right": top1_right}
    if strict is not None:
        out["recall_unseen_strict"], out["_strict"] = rec(strict), strict
    return out


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def dev_threshold(model, cache: FeatureCache, keep_hits: float, factory: str = "Flat", k: int = 10,
                  gloss=None, index=None, log=print, reranker=None) -> float | None:
    """The score that keeps `keep_hits` of the top-1 hits of the dev split of `cache` (the run's own);
    None, with a message, when there is no dev split or no dev top-1 hit. With `reranker` (a second stage),
    on its fused scores of dev's re-ranked candidates (second_eval.dev_threshold_of): the scores the
    threshold then reads. Eval and the retriever both pick it here."""
    if "audio/dev" not in cache.tables:
        log("the run's cache has no dev split: no rejection threshold (it is never picked on the evaluated split)")
        return None
    vecs, owner = gloss if gloss is not None else embed_glossary(model, cache)
    if reranker is not None:
        from stage3_index.second_eval import dev_threshold_of, second_ranking, split_view
        view = split_view(model, cache, cache, "dev", max(3 * k, reranker.top_n), 0, reranker,
                          (vecs, np.asarray(owner, dtype=np.int64)), log=log)
        t = dev_threshold_of(view, *second_ranking(view, reranker), keep_hits, k)
        if t is None:
            log("dev has no top-1 hit: no rejection threshold (it is never picked on the evaluated split)")
        return t
    if index is None:
        index, _ = build_or_flat(vecs, factory, log)
    dev = SplitData(cache, "dev")
    audio = embed(model.audio, dev.audio.items(range(len(dev))))
    ids, scores, _ = rank_terms(index, len(vecs), owner, audio, k)
    chunk, _, hits = query_hits(ids, dev.terms, (1,))
    right = np.zeros(len(dev), dtype=bool)
    right[chunk[hits[:, 0]]] = True
    if not right.any():
        log("dev has no top-1 hit: no rejection threshold (it is never picked on the evaluated split)")
        return None
    return pick_threshold(scores[right, 0], keep_hits)


# ---------------------------------------------------------------- glossary sizes

def distractor_rows(split_terms, owner: np.ndarray, n_terms: int, n_dist: int, size: int):
    """(row selection into the glossary rows, number of distractors) for a glossary of `size` terms:
    every row of the split's terms, then the first distractors up to `size` terms in all."""
    rows = np.flatnonzero(np.isin(owner, np.asarray(sorted(split_terms), dtype=np.int64)))
    n_pad = int(min(max(0, size - len(split_terms)), n_dist))
    return rows, n_pad


def by_glossary_size(audio, gold, split_terms, vecs, owner, n_terms, dist_vecs, sizes, factory, ks, log,
                     second=None):
    """{real size: {"recall": {K: ...}, "qps": ..., "distractors": n, "index": kind}}.

    second: (reranker, window frames, the glossary rows' forms, the distractors' forms) to rank with the
    second stage (its fused order gives "recall", qps counts the re-scoring too); the first stage's own
    recall is kept under "first_stage"."""
    out = {}
    k = max(ks)
    for size in sorted(set(int(s) for s in sizes)):
        rows, n_pad = distractor_rows(split_terms, owner, n_terms, len(dist_vecs), size)
        real = len(split_terms) + n_pad
        if str(real) in out:
            continue
        if real < size:
            log(f"glossary size {size}: only {n_pad} distractors in the cache, row {real} "
                "(raise data.n_distractors and rerun extract: only that table is redone)")
        sub = np.concatenate([vecs[rows], dist_vecs[:n_pad]]).astype(np.float32)
        sub_owner = np.concatenate([owner[rows], n_terms + np.arange(n_pad, dtype=np.int64)])
        index, kind = build_or_flat(sub, factory, log)
        first = None
        if second is None:
            ids, _, secs = rank_terms(index, len(sub), sub_owner, audio, k)
        else:
            from stage3_index.second_eval import rescored
            rr, frames, forms, dist_forms = second
            shallow = max(1, min(3 * k, len(sub)))       # what rank_terms searches: the first stage alone
            s, r, secs = search_blocks(index, audio, max(shallow, min(rr.top_n, len(sub))))
            first, _ = rows_to_terms(r[:, :shallow], s[:, :shallow], sub_owner, k)
            sub_forms = {f: [forms[f][i] for i in rows] + list(dist_forms[f][:n_pad])
                         for f in ("spell", "phones") if forms.get(f) is not None and dist_forms.get(f) is not None}
            t0 = time.perf_counter()
            ids, _ = rows_to_terms(*rescored(rr, frames, r, s, rr.token_table(sub_forms)), sub_owner, k)
            secs += time.perf_counter() - t0
        _, _, h = query_hits(ids, gold, ks)
        out[str(real)] = {"recall": _recall_of(h, ks), "qps": float(len(audio) / max(secs, 1e-9)),
                          "distractors": n_pad, "index": kind}
        if first is not None:
            out[str(real)]["first_stage"] = {"recall": _recall_of(query_hits(first, gold, ks)[2], ks)}
    return out


def _recall_of(h: np.ndarray, ks) -> dict:
    return {str(kk): (float(h[:, i].mean()) if len(h) else None) for i, kk in enumerate(ks)}


# ---------------------------------------------------------------- the cascade baseline

TRANSCRIBE_HINT = "python -m stage1_extract transcribe --config CONFIG --split {split} --out {cache}"


def read_transcripts(cache: FeatureCache, split: str) -> dict[str, str] | None:
    """{chunk id: transcript} from `<cache>/transcripts/<split>.jsonl`, or None when absent."""
    path = cache.root / "transcripts" / f"{split}.jsonl"
    if not path.is_file():
        return None
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[str(rec["id"])] = str(rec.get("text") or "")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BadInput("not a transcript record ({\"id\": ..., \"text\": ...})", file=path, record=f"line {n}",
                           fix="rerun the transcription") from None
    return out


def transcripts_header(cache: FeatureCache, split: str) -> dict:
    """The header `<cache>/transcripts/<split>.json` that `transcribe` writes last ({} when absent)."""
    path = cache.root / "transcripts" / f"{split}.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise BadInput("not a transcripts header (JSON)", file=path, fix="rerun the transcription") from None


def transcripts_subset(cache: FeatureCache, split: str, data: SplitData) -> np.ndarray | None:
    """Rows of `data` its transcripts cover when they were made for a fixed subset (`transcribe` with
    extract.asr_every > 1); None when they cover the whole split (or there are none). Every figure that
    reads transcripts (the cascade, ours beside it, ours + transcript) is then taken on these rows only."""
    if int(transcripts_header(cache, split).get("every") or 1) <= 1:
        return None
    said = read_transcripts(cache, split) or {}
    return np.array([n for n, i in enumerate(data.ids[:len(data)]) if str(i) in said], dtype=np.int64)


def cascade_baseline(cache: FeatureCache, split: str, data: SplitData, seen_term, ks, split_terms,
                     dist_texts: list[str], sizes, log, *, ours=None, scorer: str | None = None) -> dict | None:
    """The cascade's recall / seen / unseen / AUROC on the same queries (and glossary sizes), or None.

    scorer: stage3_index.cascade's fuzzy scorer (eval.cascade_scorer; None = its default). When the
    split's transcripts cover a fixed subset (`transcribe` with extract.asr_every = k > 1, recorded in
    their header), the cascade is scored on the chunks of that subset only, and `ours` ((ids, scores)
    of our ranking of every chunk of the split) on the very same chunks beside it: "ours_same_chunks".
    "asr" says how the transcripts were decoded (Whisper's mode) and which chunks they cover.
    """
    transcripts = read_transcripts(cache, split)
    if transcripts is None:
        log(f"no transcripts for split {split!r} of {cache.root}: baseline skipped; make them with "
            + TRANSCRIBE_HINT.format(cache=cache.root, split=split))
        return None
    from stage3_index.cascade import DEFAULT_SCORER, SCORERS, CascadeMatcher, rank_all, term_forms
    scorer = scorer or DEFAULT_SCORER
    if scorer not in SCORERS:
        raise BadInput(f"eval.cascade_scorer {scorer!r} is not one of {', '.join(SCORERS)}", file="config [eval]",
                       fix=f"the default is {DEFAULT_SCORER!r}")
    head = transcripts_header(cache, split)
    fp = head.get("fingerprint") or {}
    decoding = fp.get("decoding") or {}
    # headers written before the modes existed padded each batch to its longest chunk + 1 s
    mode = decoding.get("mode") or ("fast" if "pad_seconds" in decoding else fp.get("asr"))
    every = int(head.get("every") or 1)
    g = cache.read_json("glossary.json")
    texts = g["texts"] if g.get("text_field", "term") == "term" else None
    forms, owner = term_forms(g["keys"], g.get("aliases", {}), texts)
    ids_order = [str(i) for i in data.ids[:len(data)]]
    chosen = transcripts_subset(cache, split, data)
    if chosen is not None:
        log(f"baseline: the transcripts cover one chunk in {every} ({len(chosen)} of {len(ids_order)}): the "
            "cascade, and ours beside it, on those chunks")
    else:
        chosen = np.arange(len(ids_order), dtype=np.int64)
        missing = sum(i not in transcripts for i in ids_order)
        if missing:
            log(f"baseline: {missing} of {len(ids_order)} chunks have no transcript (scored as empty)")
    said = [transcripts.get(ids_order[n], "") for n in chosen]
    gold = [data.terms[n] for n in chosen]
    k = max(ks)
    t0 = time.perf_counter()
    ids, scores = rank_all(said, forms, owner, k, matcher=CascadeMatcher(forms, owner, scorer))
    secs = time.perf_counter() - t0
    r = score_ranking(ids, scores, gold, seen_term, ks)
    out = {key: r[key] for key in ("recall", "recall_seen", "recall_unseen", "recall_unseen_strict", "auroc",
                                   "auroc_top1_correct") if key in r}
    out["qps"] = float(len(said) / max(secs, 1e-9))
    out["queries"] = int(len(r["_term"]))
    out["scorer"] = scorer
    out["asr"] = {"mode": mode, "pad": decoding.get("pad", ""), "every": every, "chunks": int(len(chosen)),
                  "split_chunks": len(ids_order)}
    if every > 1 and ours is not None:
        same = score_ranking(np.asarray(ours[0])[chosen], np.asarray(ours[1])[chosen], gold, seen_term, ks)
        out["ours_same_chunks"] = {key: same[key] for key in ("recall", "recall_seen", "recall_unseen",
                                                              "recall_unseen_strict") if key in same}
    n_terms = len(g["keys"])
    rows = {}
    owner = np.asarray(owner, dtype=np.int64)
    keep = np.isin(owner, np.asarray(sorted(split_terms), dtype=np.int64))
    base_forms = [f for f, kf in zip(forms, keep) if kf]
    base_owner = owner[keep]
    for size in sorted(set(int(s) for s in sizes)):
        n_pad = int(min(max(0, size - len(split_terms)), len(dist_texts)))
        real = len(split_terms) + n_pad
        if str(real) in rows or not dist_texts:
            continue
        f = base_forms + [normalize(t) for t in dist_texts[:n_pad]]
        o = np.concatenate([base_owner, n_terms + np.arange(n_pad, dtype=np.int64)])
        t0 = time.perf_counter()
        ids_s, _ = rank_all(said, f, o, k, matcher=CascadeMatcher(f, o, scorer))
        secs = time.perf_counter() - t0
        _, _, h = query_hits(ids_s, gold, ks)
        rows[str(real)] = {"recall": {str(kk): (float(h[:, i].mean()) if len(h) else None) for i, kk in enumerate(ks)},
                           "qps": float(len(said) / max(secs, 1e-9)), "distractors": n_pad}
    out["by_glossary_size"] = rows
    return out


# ---------------------------------------------------------------- ours + transcript

FUSION_DEPTH = 30        # our candidates per chunk for fusion (the cascade adds its top 10)
FUSED_FIRST_NOTE = ("'ours + transcript' fuses the transcript with the first stage's cosines, not the second stage's "
                    "ranking: fusion adds cosines of the cascade's own candidates, on another scale than fused scores")
DEV_FUSED_NOTE = ("dev is where the fusion weight is picked: 'ours + transcript' is not reported on dev itself "
                  "(evaluate test)")


def _fused_ranking(cache, split, data, audio, index, vecs, owner, k):
    from stage3_index.cascade import CascadeMatcher, term_forms
    from stage3_index.fusion import fuse
    transcripts = read_transcripts(cache, split)
    if transcripts is None:
        return None
    g = cache.read_json("glossary.json")
    texts = g["texts"] if g.get("text_field", "term") == "term" else None
    matcher = CascadeMatcher(*term_forms(g["keys"], g.get("aliases", {}), texts))
    fuzzy = [matcher.term_scores(transcripts.get(str(i), "")) for i in data.ids[:len(data)]]
    ids, scores, _ = rank_terms(index, len(vecs), owner, audio, min(FUSION_DEPTH, int(owner.max()) + 1))
    return lambda w: fuse(ids, scores, audio, vecs, owner, fuzzy, w, k)


def fused_report(model, own, cache, split, data, audio, index, vecs, owner, seen_term, ks, weights, log):
    """Recall / seen / unseen / AUROC of our scores fused with the transcript's (stage3_index/fusion.py),
    the weight picked on the dev split of the run's own cache; None when dev has no transcripts, and when
    dev itself is evaluated (the weight would be tuned on the figures it reports)."""
    from stage3_index.fusion import pick_weight
    k = max(ks)
    if cache is own and split == "dev":
        log(DEV_FUSED_NOTE)
        return None
    if "audio/dev" not in own.tables or read_transcripts(own, "dev") is None:
        log("no transcripts of the run's dev split: 'ours + transcript' not reported (its weight is picked on "
            "dev); make them with " + TRANSCRIBE_HINT.format(cache=own.root, split="dev"))
        return None
    if cache is own:
        dvecs, downer, dindex = vecs, owner, index
    else:
        dvecs, downer = embed_glossary(model, own)
        dindex, _ = build_or_flat(dvecs, "Flat", log)
    dev = SplitData(own, "dev")
    dev_audio = embed(model.audio, dev.audio.items(range(len(dev))))
    dev_rank = _fused_ranking(own, "dev", dev, dev_audio, dindex, dvecs, downer, k)
    dev_rows = transcripts_subset(own, "dev", dev)       # None = all of dev has transcripts
    dev_terms = dev.terms[:len(dev)] if dev_rows is None else [dev.terms[n] for n in dev_rows]

    def on_dev(w):
        ids, _ = dev_rank(w)
        _, _, h = query_hits(ids if dev_rows is None else ids[dev_rows], dev_terms, ks)
        return {str(kk): float(h[:, i].mean()) for i, kk in enumerate(ks)}

    weight, tried = pick_weight(on_dev, weights)
    ranked = _fused_ranking(cache, split, data, audio, index, vecs, owner, k)
    ids, scores = ranked(weight)
    rows = transcripts_subset(cache, split, data)
    if rows is not None:
        ids, scores = ids[rows], scores[rows]
    r = score_ranking(ids, scores, data.terms[:len(data)] if rows is None else [data.terms[n] for n in rows],
                      seen_term, ks)
    log(f"ours + transcript: weight {weight} picked on dev (dev mean R@1/5/10 by weight: "
        + ", ".join(f"{w}: {np.mean(list(v.values())):.3f}" for w, v in tried.items()) + ")")
    return {**{key: r[key] for key in ("recall", "recall_seen", "recall_unseen", "recall_unseen_strict", "auroc")
               if key in r}, "weight": weight}


# ---------------------------------------------------------------- the command

def eval_config(run_cfg: Config, config: str | Path | None = None, overrides=()) -> Config:
    """The run's saved config, then a config file, then --set overrides (eval.* keys matter here)."""
    if isinstance(overrides, dict):
        overrides = [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in overrides.items()]
    return load_config(config, list(overrides), base=run_cfg)


@dataclass
class EvalInputs:
    """What one evaluation reads: the run (model, saved and effective config, its own cache) and the cache
    and split evaluated, with where the report goes."""
    run: Path
    model: object
    ckpt_path: Path
    run_cfg: Config
    cfg: Config
    own: FeatureCache
    cache: FeatureCache
    split: str
    factory: str
    ks: list[int]
    out: Path
    reranker: object = None       # the run's second stage (RUN/second.pt) when it ranks; None = first stage only


def second_off(overrides) -> bool:
    """An explicit `--set second.enabled=false`: evaluate the first stage alone although the run has a second
    stage (the run's saved config says nothing here: a second stage added later by stage2_train.second does
    not rewrite it)."""
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    for o in overrides or ():
        key, _, val = str(o).partition("=")
        if key.strip() == "second.enabled" and val.strip().lower() in ("false", "0", "no", "off"):
            return True
    return False


def eval_inputs(run: str | Path, split: str | None = None, *, features: str | Path | None = None,
                config: str | Path | None = None, overrides=(), factory: str | None = None,
                second: bool = True) -> EvalInputs:
    """Load the run and pick the cache and split: the run's own cache (report in RUN/eval/SPLIT/) or
    `features`, another corpus made with the same backbone (RUN/eval/CACHENAME.SPLIT/). The run's second
    stage ranks when it has one, unless `second` is False or `--set second.enabled=false`."""
    run = Path(run)
    model, _, run_cfg, own, ckpt_path = load_run(run)
    cfg = eval_config(run_cfg, config, overrides)
    from shared.second_stage import Reranker
    reranker = Reranker.load(run) if second and not second_off(overrides) else None
    split = split or cfg.eval.split
    if features is not None and Path(features).resolve() != own.root.resolve():
        cache = FeatureCache(features)
        check_same_backbone(own, cache)
        out = run / "eval" / f"{cache.root.name}.{split}"
    else:
        cache = own
        out = run / "eval" / split
    if f"audio/{split}" not in cache.tables:
        have = sorted(t.split("/", 1)[1] for t in cache.tables if t.startswith("audio/"))
        raise BadInput(f"the cache has no split {split!r} (it has: {', '.join(have)})", file=cache.root,
                       fix="choose one of those with --split")
    return EvalInputs(run, model, ckpt_path, run_cfg, cfg, own, cache, split, factory or cfg.eval.index,
                      sorted(set(int(k) for k in cfg.eval.ks)), out, reranker)


def evaluate(run: str | Path, split: str | None = None, *, features: str | Path | None = None,
             config: str | Path | None = None, overrides=(), factory: str | None = None, second: bool = True,
             log=print) -> dict:
    """Write the report of `run` on `split` (default eval.split) of its own feature cache, or of the
    cache `features`, to RUN/eval/SPLIT/ or RUN/eval/CACHENAME.SPLIT/; return it (with details).
    second: rank with the run's second stage when it has one (False: the first stage alone)."""
    t_start = time.time()
    e = eval_inputs(run, split, features=features, config=config, overrides=overrides, factory=factory,
                    second=second)
    e.out.mkdir(parents=True, exist_ok=True)
    report, details, term_scores, noterm_scores = compute_report(e, log)
    full = {**report, **details}
    write_report(e.out, e.run.name, report, details, term_scores, noterm_scores)
    r, rej, baseline = report["recall"], report["rejection"], report["baseline"]
    log(figures(queries=report["queries"], glossary=report["glossary_size"], r1=_f(r.get("1")), r5=_f(r.get("5")),
                r10=_f(r.get("10")), auroc=_f(rej["auroc"]), far=_f(rej["far"]), qps=report["qps"],
                baseline_r5=_f((baseline or {}).get("recall", {}).get("5")), seconds=time.time() - t_start))
    full["out"] = str(e.out)
    return full


def write_report(out: Path, name: str, report: dict, details: dict, term_scores, noterm_scores) -> None:
    """report.md, the plots, details.json, and report.json last (what compare reads means all is written)."""
    full = {**report, **details}
    (out / "report.md").write_text(report_markdown(full, name))
    plot_report(full, term_scores, noterm_scores, out)
    _write_json(out / "details.json", details)
    _write_json(out / "report.json", report)


def compute_report(e: EvalInputs, log=print) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """(report, details, top-1 scores of term chunks, of no-term chunks): every figure of the report.
    Writes nothing but the reusable glossary index (RUN/eval/.../glossary.index)."""
    model, own, cache, split, factory, ks, out = e.model, e.own, e.cache, e.split, e.factory, e.ks, e.out
    cfg, run_cfg, keep_hits = e.cfg, e.run_cfg, e.cfg.eval.keep_hits
    glossary = cache.read_json("glossary.json")
    keys = glossary["keys"]
    n_terms = len(keys)
    train_keys = trained_keys(own, run_cfg.train.limit)
    seen_term = SeenTerms(keys, train_keys,
                          strictly_unseen_terms(glossary, train_keys, trained_words(own, run_cfg.train.limit)))

    vecs, owner = embed_glossary(model, cache)
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    owner = np.asarray(owner, dtype=np.int64)
    import hashlib
    meta = {"vectors_sha256": hashlib.sha256(vecs.tobytes()).hexdigest(), "factory": factory, "rows": len(vecs)}
    index = load_index_if(out / "glossary.index", meta)
    build_seconds = 0.0
    kind = factory
    if index is None:
        t0 = time.perf_counter()
        index, kind = build_or_flat(vecs, factory, log)
        build_seconds = time.perf_counter() - t0
        save_index(index, out / "glossary.index", {**meta, "factory": kind} if kind != factory else meta)
    else:
        log(f"reusing the glossary index in {out / 'glossary.index'}")

    data = SplitData(cache, split)
    gold = data.terms[:len(data)]
    items = data.audio.items(range(len(data)))
    audio = embed(model.audio, items)
    k = max(ks)
    ids, scores, search_s = rank_terms(index, len(vecs), owner, audio, k)
    rr, first_r, second = e.reranker, None, None
    if rr is not None:
        # the second stage ranks: the first stage's top_n rows of each chunk re-scored (second_eval.rescored);
        # the first stage's own figures are kept beside (report["first_stage"])
        from shared.second_stage import tower_frames
        from stage3_index.second_eval import _forms, rescored
        first_r, first_s = score_ranking(ids, scores, gold, seen_term, ks), search_s
        frames = tower_frames(model.audio, items)
        forms = _forms(cache, "glossary")
        s, rws, search_s = search_blocks(index, audio, max(1, min(max(3 * k, rr.top_n), len(vecs))))
        t0 = time.perf_counter()
        ids, scores = rows_to_terms(*rescored(rr, frames, rws, s, rr.token_table(forms)), owner, k)
        search_s += time.perf_counter() - t0
        second = [rr, frames, forms, None]
    del items
    r = score_ranking(ids, scores, gold, seen_term, ks)

    # threshold: on the run's own dev only
    first_threshold = None
    if cache is own and split == "dev":
        threshold = None
        note = "dev is where the threshold is picked: it is not reported on dev itself (evaluate test)"
        log(note)
    else:
        notes = []
        same = cache is own
        own_gloss = (vecs, owner) if same else embed_glossary(model, own)
        threshold = dev_threshold(model, own, keep_hits, factory, k, gloss=own_gloss, index=index if same else None,
                                  log=notes.append, reranker=rr)
        note = notes[-1] if notes else "picked on the dev split of the run's own cache" + \
            (" (the second stage's fused scores)" if rr is not None else "")
        for n in notes:
            log(n)
        if rr is not None:
            first_threshold = dev_threshold(model, own, keep_hits, factory, k, gloss=own_gloss,
                                            index=index if same else None, log=lambda *_: None)
    rej = rejection_of(r, threshold)
    max_score, term_chunk = r["_max"], r["_term_chunk"]

    split_terms = sorted({t for ts in gold for t in ts})
    dist_texts: list[str] = []
    dropped = None
    kept = kept_distractors(model, own, cache)
    if kept is not None:
        dist_cache, ok, dist_texts, dist_vecs, dropped = kept
        log(f"distractors: {len(ok)} of {len(dist_cache.read_json('distractors.json'))} kept ({dropped['glossary']} "
            f"clash with a glossary form, {dropped['spoken']} more are spoken in the corpus)")
        if second is not None:
            from stage3_index.second_eval import _forms
            dforms = _forms(dist_cache, "distractors")
            second[3] = {f: (None if v is None else [v[i] for i in ok]) for f, v in dforms.items()}
        by_size = by_glossary_size(audio, gold, split_terms, vecs, owner, n_terms, dist_vecs,
                                   cfg.eval.glossary_sizes, factory, ks, log, second=second)
    else:
        by_size = {}
        log("the cache has no distractors: no glossary-size rows; add them with `python -m stage1_extract "
            "extract --set data.distractors=builtin` (only that table is extracted, the audio is kept)")

    baseline = cascade_baseline(cache, split, data, seen_term, ks, split_terms, dist_texts,
                                cfg.eval.glossary_sizes, log, ours=(ids, scores), scorer=cfg.eval.cascade_scorer)
    fused = fused_report(model, own, cache, split, data, audio, index, vecs, owner, seen_term, ks,
                         cfg.eval.fusion_weights, log) if baseline is not None and cfg.eval.fusion_weights else None
    fused_note = DEV_FUSED_NOTE if cache is own and split == "dev" and baseline is not None else None
    if fused is not None and rr is not None:
        fused_note = FUSED_FIRST_NOTE

    report = {"recall": r["recall"], "recall_seen": r["recall_seen"], "recall_unseen": r["recall_unseen"],
              "recall_unseen_strict": r["recall_unseen_strict"],
              "by_glossary_size": by_size, "rejection": rej, "queries": int(len(r["_term"])),
              "glossary_size": int(n_terms), "qps": float(len(audio) / max(search_s, 1e-9)), "baseline": baseline,
              "fused": fused, "second_stage": rr is not None,
              "first_stage": None if first_r is None else {
                  "recall": first_r["recall"], "recall_seen": first_r["recall_seen"],
                  "recall_unseen": first_r["recall_unseen"], "recall_unseen_strict": first_r["recall_unseen_strict"],
                  "rejection": rejection_of(first_r, first_threshold),
                  "by_glossary_size": {size: row["first_stage"] for size, row in by_size.items()},
                  "qps": float(len(audio) / max(first_s, 1e-9))}}
    details = {"index": kind, "index_build_seconds": round(build_seconds, 4), "split": split,
               "features": str(cache.root), "own_cache": cache is own, "glossary_rows": int(len(vecs)),
               "seen_queries": int(r["_seen"].sum()), "unseen_queries": int((~r["_seen"]).sum()),
               "unseen_strict_queries": int(r["_strict"].sum()),
               "unseen_strict_terms": int(sum(seen_term.strict[t] for t in split_terms)),
               "term_chunks": int(term_chunk.sum()), "noterm_chunks": int((~term_chunk).sum()),
               "split_terms": len(split_terms), "threshold_note": note, "fused_note": fused_note,
               "keep_hits": keep_hits,
               "distractors": len(dist_texts), "distractors_dropped": dropped, "train_limit": run_cfg.train.limit,
               "checkpoint": e.ckpt_path.name, "checkpoint_sha256": file_sha256(e.ckpt_path),
               "second_stage_sha256": None if rr is None else file_sha256(e.run / "second.pt")}
    return report, details, max_score[term_chunk], max_score[~term_chunk]


def rejection_of(r: dict, threshold) -> dict:
    """AUROCs of a ranking's top-1 scores (score_ranking's `r`), and its FAR and recall@1 at `threshold`."""
    max_score, term_chunk = r["_max"], r["_term_chunk"]
    return {"auroc": r["auroc"], "auroc_top1_correct": r["auroc_top1_correct"], "threshold": threshold,
            "far": None if threshold is None else _num(false_alarm_rate(max_score[~term_chunk], threshold)),
            "recall_at_threshold": None if threshold is None else
            _num(recall_at_threshold(r["_hits"][:, 0], max_score[r["_chunk"]], threshold))}


def _f(x):
    return float("nan") if x is None else float(x)


def _write_json(path: Path, data) -> None:
    write_json_atomic(path, data, indent=2)


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def report_markdown(r: dict, name: str = "") -> str:
    ks = list(r["recall"])
    where = r["split"] if r.get("own_cache", True) else f"{Path(r['features']).name}.{r['split']}"
    b = r.get("baseline")
    stage = ", second stage" if r.get("second_stage") else ""
    lines = [f"## {name} ({where}: {r['queries']} queries, glossary {r['glossary_size']}, index {r['index']}{stage})",
             "",
             "| | " + " | ".join(f"R@{k}" for k in ks) + " | queries |", "|---" * (len(ks) + 2) + "|",
             "| all | " + " | ".join(_fmt(r["recall"][k]) for k in ks) + f" | {r['queries']} |",
             "| seen terms | " + " | ".join(_fmt(r["recall_seen"][k]) for k in ks) + f" | {r['seen_queries']} |",
             "| unseen terms | " + " | ".join(_fmt(r["recall_unseen"][k]) for k in ks) + f" | {r['unseen_queries']} |"]
    if "recall_unseen_strict" in r:      # reports written before it have no such key
        lines.append("| strictly unseen terms (no word heard in training) | "
                     + " | ".join(_fmt(r["recall_unseen_strict"][k]) for k in ks)
                     + f" | {r.get('unseen_strict_queries', '')} |")
    if b:
        bq = b.get("queries", "")
        lines += ["| cascade (ASR + fuzzy match): all | " + " | ".join(_fmt(b["recall"][k]) for k in ks) + f" | {bq} |",
                  "| cascade: seen terms | " + " | ".join(_fmt(b["recall_seen"][k]) for k in ks) + " | |",
                  "| cascade: unseen terms | " + " | ".join(_fmt(b["recall_unseen"][k]) for k in ks) + " | |"]
        same = b.get("ours_same_chunks")
        if same:
            lines += ["| ours on the cascade's chunks: all | " + " | ".join(_fmt(same["recall"][k]) for k in ks)
                      + f" | {bq} |", "| ours on the cascade's chunks: unseen terms | "
                      + " | ".join(_fmt(same["recall_unseen"][k]) for k in ks) + " | |"]
    fs = r.get("first_stage")
    if fs:
        lines += ["| first stage alone: all | " + " | ".join(_fmt(fs["recall"][k]) for k in ks) + f" | {r['queries']} |",
                  "| first stage alone: unseen terms | " + " | ".join(_fmt(fs["recall_unseen"][k]) for k in ks)
                  + " | |"]
    fz = r.get("fused")
    if fz:
        lines += [f"| ours + transcript (weight {fz['weight']} from dev): all | "
                  + " | ".join(_fmt(fz["recall"][k]) for k in ks) + " | |",
                  "| ours + transcript: unseen terms | " + " | ".join(_fmt(fz["recall_unseen"][k]) for k in ks) + " | |"]
    for size, row in r["by_glossary_size"].items():
        lines.append(f"| glossary {size} ({row['distractors']} distractors) | "
                     + " | ".join(_fmt(row["recall"][k]) for k in ks) + f" | {row['qps']:.0f} q/s |")
        if row.get("first_stage"):
            lines.append(f"| first stage alone, glossary {size} | "
                         + " | ".join(_fmt(row["first_stage"]["recall"][k]) for k in ks) + " | |")
        brow = (b or {}).get("by_glossary_size", {}).get(size)
        if brow:
            lines.append(f"| cascade, glossary {size} | " + " | ".join(_fmt(brow["recall"][k]) for k in ks)
                         + f" | {brow['qps']:.0f} q/s |")
    j = r["rejection"]
    lines += ["", "| rejection | AUROC (all term chunks) | AUROC (top-1 correct) | threshold (dev) | "
              "false alarms (no-term) | recall@1 at threshold | QPS |", "|---|---|---|---|---|---|---|",
              f"| ours: {r['term_chunks']} term / {r['noterm_chunks']} no-term chunks | {_fmt(j['auroc'])} | "
              f"{_fmt(j['auroc_top1_correct'])} | {_fmt(j['threshold'])} | {_fmt(j['far'])} | "
              f"{_fmt(j['recall_at_threshold'])} | {r['qps']:.0f} |"]
    if fs:
        fj = fs["rejection"]
        lines.append(f"| first stage alone | {_fmt(fj['auroc'])} | {_fmt(fj['auroc_top1_correct'])} | "
                     f"{_fmt(fj['threshold'])} | {_fmt(fj['far'])} | {_fmt(fj['recall_at_threshold'])} | "
                     f"{fs['qps']:.0f} |")
    if b:
        lines.append(f"| cascade (top-1 fuzzy score) | {_fmt(b['auroc'])} | {_fmt(b.get('auroc_top1_correct'))} "
                     f"| | | | {b['qps']:.0f} |")
    if j["threshold"] is None:
        lines += ["", f"No threshold: {r.get('threshold_note', '')}"]
    if r.get("fused_note"):
        lines += ["", ("Note: " if r.get("fused") else "No 'ours + transcript': ") + r["fused_note"]]
    if r.get("own_cache", True) and r["split"] == "dev":
        lines += ["", "Dev also chose this run's checkpoint (early stopping on dev R@5): its figures are not "
                  "held out; report test."]
    if not b:
        lines += ["", "No cascade baseline: the split has no cached transcripts."]
    elif b.get("asr"):
        a = b["asr"]
        lines += ["", f"Cascade: Whisper decoding {a.get('mode')} ({a.get('pad', '')}), fuzzy scorer {b.get('scorer')}"
                  + (f"; transcripts of one chunk in {a['every']} only ({a['chunks']} of {a['split_chunks']}): the "
                     "cascade's rows, ours on the cascade's chunks and ours + transcript are on those."
                     if a.get("every", 1) > 1 else ".")]
    return "\n".join(lines) + "\n"


def plot_report(r: dict, term_scores, noterm_scores, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = [(f"glossary {r['glossary_size']} (own)", r["recall"])] + \
        [(f"glossary {s}", row["recall"]) for s, row in r["by_glossary_size"].items()]
    if r.get("baseline"):
        rows.append(("cascade", r["baseline"]["recall"]))
    for label, rec in rows:
        ks = [int(k) for k in rec]
        ax.plot(ks, [np.nan if rec[str(k)] is None else rec[str(k)] for k in ks], marker="o", label=label)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "recall_at_k.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    finite = np.concatenate([np.asarray(term_scores, float), np.asarray(noterm_scores, float)])
    finite = finite[np.isfinite(finite)]
    lo = float(min(finite.min(initial=0.0), 0.0))
    bins = np.linspace(lo, 1, 40)
    for scores, label in ((term_scores, "term chunks"), (noterm_scores, "no-term chunks")):
        scores = np.asarray(scores, float)
        scores = scores[np.isfinite(scores)]
        if len(scores):        # a split without no-term chunks has nothing to draw (density of nothing)
            ax.hist(scores, bins=bins, alpha=0.6, density=True, label=label)
    if r["rejection"]["threshold"] is not None:
        ax.axvline(r["rejection"]["threshold"], color="k", linestyle="--", label="threshold (dev)")
    ax.set_xlabel("max score over the glossary")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "max_scores.png", dpi=100)
    plt.close(fig)
