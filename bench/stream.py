"""stream: the live retriever's latency per window with a 10,000-term glossary (and 100,000), with the run's
second stage when it has one."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from shared.config import Config
from bench.common import ENCODER_THREADS, _require_inputs, torch_threads
from shared.errors import BadInput


# ---------------------------------------------------------------- stream: inference latency

def talk_audio(manifest: Path, seconds: float) -> np.ndarray:
    """About `seconds` of real speech: the whole recordings behind a manifest's first chunks, end to end."""
    from shared.audio import read_audio
    from shared.manifest import read_chunks
    parts, total, seen = [], 0, set()
    for c in read_chunks(manifest):
        if c.audio in seen:
            continue
        seen.add(c.audio)
        parts.append(read_audio(c.audio, allow_silent=True))
        total += len(parts[-1])
        if total >= seconds * 16000:
            break
    return np.concatenate(parts)[:int(seconds * 16000)]


def stream_glossary(features: Path, n_terms: int, path: Path) -> Path:
    """A glossary file of `n_terms` real-looking names, one per line: the demo's terms, the cache's real
    distractor names, then two-word combinations of its one-word names (as many as needed)."""
    import itertools
    from shared.cache import FeatureCache
    from shared.glossary import normalize
    cache = FeatureCache(features)
    terms = list(cache.read_json("glossary.json")["texts"])
    names = cache.read_json("distractors.json") if (cache.root / "distractors.json").is_file() else []
    terms += names
    words = [w for w in names if " " not in w] or ["alpha", "beta", "gamma", "delta"]
    seen = {normalize(t) for t in terms}
    for a, b in itertools.product(words, words):
        if len(terms) >= n_terms:
            break
        if a != b and normalize(f"{a} {b}") not in seen:
            terms.append(f"{a} {b}")
    path.write_text("\n".join(terms[:n_terms]) + "\n", encoding="utf-8")
    return path


def bench_stream(cfg: Config, run: str | Path, out: Path, n_terms: int, seconds: float, log,
                 block_ms: int = 20, large_terms: int | None = None) -> tuple[dict, dict]:
    """The live path a translator runs: `Retriever.stream()` fed `block_ms` blocks of a real recording,
    with a glossary of `n_terms` the run never saw (embedded once before timing), then again with
    `large_terms` (default 10 x n_terms: 100,000 beside the 10,000 of the target; padded with two-word
    combinations of real names, `stream_glossary`). Per window: the wall time of the push that completed it
    (backbone + audio side + search + the second stage's re-scoring when the run has one, RUN/second.pt);
    RTF = all pushes / audio. The main figures are those at `n_terms`; "by_terms" has both sizes."""
    import faiss
    from stage3_index.retriever import Retriever
    run = Path(run)
    if not run.is_dir():
        raise BadInput("the stream part needs a trained run", file=run, fix="run make first (make train)")
    _, features = _require_inputs(cfg)
    manifest = Path(cfg.data.chunks) / "test.jsonl"
    wav = talk_audio(manifest, seconds)
    audio_s = len(wav) / 16000
    by_terms, details = {}, {}
    for size in dict.fromkeys([n_terms, large_terms or 10 * n_terms]):
        gpath = stream_glossary(features, size, out / f"stream_glossary_{size}.txt")
        t0 = time.perf_counter()
        r = Retriever.load(run, glossary=gpath, log=log)
        load_s = time.perf_counter() - t0
        with torch_threads(ENCODER_THREADS):
            faiss.omp_set_num_threads(ENCODER_THREADS)
            per_window, busy, n_windows = _time_stream(r, wav, block_ms)
        row = {"window_ms_p50": float(np.percentile(per_window, 50)),
               "window_ms_p95": float(np.percentile(per_window, 95)),
               "real_time_factor": busy / audio_s, "glossary_terms": len(r.glossary.terms),
               "glossary_rows": len(r.glossary.owner), "index": r.glossary.factory, "load_seconds": load_s,
               "windows": n_windows}
        by_terms[str(size)] = row
        log(f"stream, {len(r.glossary.terms):,} terms{' + second stage' if r.reranker is not None else ''}: "
            f"{n_windows} windows over {audio_s:.0f} s, p50 {row['window_ms_p50']:.0f} ms, "
            f"p95 {row['window_ms_p95']:.0f} ms, RTF {row['real_time_factor']:.3f}")
        if not details:
            details = {"glossary_terms": row["glossary_terms"], "glossary_rows": row["glossary_rows"],
                       "index": row["index"], "audio_seconds": audio_s, "windows": n_windows, "block_ms": block_ms,
                       "window_s": r.window, "hop_s": r.hop, "threads": ENCODER_THREADS, "load_seconds": load_s,
                       "second_stage": r.reranker is not None,
                       "second_stage_top_n": None if r.reranker is None else r.reranker.top_n,
                       "run": str(run), "what": "Retriever.stream() pushes of block_ms blocks of the demo's test "
                                                "recordings; a window's time is the push that completed it"}
    main = by_terms[str(n_terms)]
    report = {"window_ms_p50": main["window_ms_p50"], "window_ms_p95": main["window_ms_p95"],
              "real_time_factor": main["real_time_factor"], "second_stage": details["second_stage"],
              "by_terms": {k: {m: v[m] for m in ("window_ms_p50", "window_ms_p95", "real_time_factor")}
                           for k, v in by_terms.items()}}
    details["by_terms"] = by_terms
    return report, details


def _time_stream(r, wav: np.ndarray, block_ms: int) -> tuple[list[float], float, int]:
    """(ms per window, seconds busy in push/flush, windows) of one pass of `wav` through `r.stream()`."""
    stream, per_window, busy, n_windows = r.stream(top_k=5), [], 0.0, 0
    block = block_ms * 16
    stream.push(wav[:int(r.window * 16000)])     # warm-up (first call allocates), not timed
    stream.flush()
    for b in range(0, len(wav), block):
        t = time.perf_counter()
        got = stream.push(wav[b:b + block])
        dt = time.perf_counter() - t
        busy += dt
        if got:
            per_window += [dt / len(got) * 1000] * len(got)
            n_windows += len(got)
    t = time.perf_counter()
    n_windows += len(stream.flush())
    busy += time.perf_counter() - t
    return per_window, busy, n_windows
