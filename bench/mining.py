"""mining: one hard-negative refresh over a 100,000-term glossary, as a share of training."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from shared.config import Config
from bench.common import TrainSetup, refresh_share, torch_threads
from bench.stream import stream_glossary


def synthetic_glossary(n: int, dim: int, seed: int, tokens=(3, 8)) -> list[np.ndarray]:
    """Cached text features of n terms: (L, dim) float16, L tokens in `tokens` (MiniLM: [CLS] term [SEP])."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(tokens[0], tokens[1] + 1, n)
    flat = rng.standard_normal((int(lengths.sum()), dim), dtype=np.float32).astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[offsets[i]:offsets[i + 1]] for i in range(n)]


def synthetic_table(trainer, lm_items: list[np.ndarray]):
    """A TermTable of len(lm_items) synthetic terms as the trainer's text side reads them: the LM
    states given, and 20-40 random n-gram ids each (a term's spelling + phones) for form parts."""
    from shared.termside import TermTable
    side = trainer.model.text
    n = len(lm_items)
    grams = None
    if side.bag is not None:
        rng = np.random.default_rng(3)
        grams = [np.unique(rng.integers(0, side.buckets, int(rng.integers(20, 41)))) for _ in range(n)]
    return TermTable(lm_items if side.lm is not None else None, np.arange(n), grams, np.arange(n))


def bench_mining(cfg: Config, setup: TrainSetup, glossary_size: int, log, run: str | Path = "cache/runs/demo",
                 features: Path | None = None, out: Path = Path("cache/bench"),
                 steps_around: int = 5) -> tuple[dict, dict]:
    """One refresh over a synthetic glossary, between `steps_around` cached steps before and after it
    (their mean is the step time of the share), all with the training's thread count."""
    trainer, batches = setup.trainer, setup.batches
    dim = int(trainer.cache.index["dims"]["text"])
    real = trainer.gloss, trainer.equivalent, trainer.owner
    synthetic = synthetic_table(trainer, synthetic_glossary(glossary_size, dim, seed=1))
    # After a full epoch every chunk has an embedding; the steps timed here saw only some, so the
    # others get random unit vectors (the search costs the same whatever the values).
    unseen = np.flatnonzero(~trainer.seen)
    if len(unseen):
        fill = np.random.default_rng(2).standard_normal((len(unseen), trainer.memory.shape[1])).astype(np.float32)
        trainer.memory[unseen] = fill / np.linalg.norm(fill, axis=1, keepdims=True)
        trainer.seen[:] = True
    # the steps are timed as training runs them after its first refresh: with mined hard negatives
    # (each adds up to hard_k glossary rows per chunk to the text side's work)
    trainer.refresh_hard_negatives()
    around = [batches[i % len(batches)] for i in range(2 * steps_around)]
    with torch_threads(setup.step_threads):
        trainer.step(around[-1])                                  # warm-up (not counted)
        t0 = time.perf_counter()
        for b in around[:steps_around]:
            trainer.step(b)
        before = time.perf_counter() - t0
        (trainer.gloss, trainer.equivalent, trainer.owner), hard = (synthetic, {}, np.arange(glossary_size)), \
            trainer.hard.copy()
        mine_from, trainer.cfg.train.mine_from = trainer.cfg.train.mine_from, "all"
        cells, trainer.cells = trainer.cells, {}
        try:
            # every synthetic row is searched: with mine_from = "train" only the rows of terms the train split
            # holds would be (a few hundred of the 100,000 here), which is not what the figure is about.
            # The first refresh of a run clusters the glossary; each later one starts from the last one's
            # cells (ListSearch): the second is what a run pays every hard_refresh steps.
            trainer.mining_seconds = 0.0
            trainer.refresh_hard_negatives()
            first = trainer.mining_seconds
            trainer.mining_seconds = 0.0
            stats = trainer.refresh_hard_negatives()
            seconds = trainer.mining_seconds
        finally:   # the mined ids point into the synthetic glossary: the real one comes back with its ids
            (trainer.gloss, trainer.equivalent, trainer.owner), trainer.hard = real, hard
            trainer.cfg.train.mine_from, trainer.cells = mine_from, cells
        t0 = time.perf_counter()
        for b in around[steps_around:]:
            trainer.step(b)
        after = time.perf_counter() - t0
    step_seconds = (before + after) / len(around)
    every = cfg.train.hard_refresh
    share = refresh_share(seconds, step_seconds, every)
    recall, recall_how = negatives_recall(cfg, run, features, out, glossary_size, log)
    report = {"glossary_size": glossary_size, "refresh_seconds": round(seconds, 3),
              "fraction_of_train": round(share, 4), "negatives_recall_vs_exact": round(recall, 3)}
    details = {"chunks": int(trainer.seen.sum()), "text_dim": dim, "hard_refresh": every,
               "step_seconds": round(step_seconds, 4), "threads": setup.step_threads,
               "search_seconds": round(stats.get("seconds", float("nan")), 3),
               "text_head_seconds": round(seconds - stats.get("seconds", float("nan")), 3),
               "random_memory_rows": int(len(unseen)), "first_refresh_seconds": round(first, 3),
               "what": "Trainer.refresh_hard_negatives with an embedding for every train chunk (as after epoch 0; "
                       "rows no timed step produced are random unit vectors): the text head over the synthetic "
                       "glossary's cached features (float16, 3-8 tokens of the real width), then the "
                       f"search of all its rows (the run's second refresh: it starts from the first one's cells) (mine_from = all) and the filters; step time = mean of the {len(around)} cached steps timed around it; "
                       "fraction = refresh / (hard_refresh x step + refresh)"}
    details["index"] = cfg.train.mine_index
    details["recall"] = recall_how
    log(f"mining: {glossary_size:,} terms, {details['chunks']} chunks: refresh {seconds:.2f} s (text head "
        f"{details['text_head_seconds']:.2f} s, search {details['search_seconds']:.2f} s) every {every} steps of "
        f"{step_seconds:.3f} s -> {share:.3f} of training; the index keeps {recall:.3f} of the exact negatives")
    return report, details


def negatives_recall(cfg: Config, run: str | Path, features: Path, out: Path, n_terms: int, log
                     ) -> tuple[float, dict]:
    """Share of the exact search's top-k negatives that the configured index (train.mine_index) also
    finds, where it matters: the trained run's dev-chunk embeddings against `n_terms` real-looking names
    (random vectors have no neighbourhoods, so no approximate index would find theirs)."""
    from shared.cache import FeatureCache
    from shared.heads import embed
    from stage2_train.data import SplitData
    from stage2_train.mining import mine_hard_negatives
    from stage3_index.retriever import Retriever
    run = Path(run)
    if not (run / "best.pt").is_file():
        log(f"mining: no trained run in {run}: the recall of the approximate search is not measured")
        return float("nan"), {"run": str(run), "measured": False}
    r = Retriever.load(run, glossary=stream_glossary(features, n_terms, out / "mining_glossary.txt"),
                       threshold=0.0, log=None)
    dev = SplitData(FeatureCache(features), "dev", in_memory="no")
    audio = embed(r.model.audio, dev.audio.items(range(len(dev))))
    none = [set() for _ in range(len(audio))]
    k = cfg.train.hard_k
    exact, _ = mine_hard_negatives(audio, r.glossary.vectors, none, k=k, index_factory="Flat")
    approx, _ = mine_hard_negatives(audio, r.glossary.vectors, none, k=k, index_factory=cfg.train.mine_index)
    recall = float(np.mean([len(set(a) & set(e)) / max(1, len(set(e))) for a, e in zip(approx, exact)]))
    return recall, {"run": str(run), "measured": True, "glossary_rows": len(r.glossary.vectors),
                    "dev_chunks": len(audio), "k": k, "index": cfg.train.mine_index}
