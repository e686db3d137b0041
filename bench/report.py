"""The targets, whether each part meets its target, and the printed tables."""
from __future__ import annotations


TARGETS = {
    "extract": "speedup >= 15 and min_cosine >= 0.99",
    "train": "speedup >= 50",
    "loader": "fraction >= 0.5 (both formats)",
    "mining": "fraction_of_train <= 0.1",
    "index": "at 1M: recall@10 >= 0.95 of exact at >= 5x Flat QPS",
    "memory": "peak RSS does not grow with the corpus (4N within 10% of N)",
    "stream": "window_ms_p95 <= 240 (a quarter of the 0.96 s hop) with a 10k-term glossary",
    "reexperiment": "train_seconds + eval_seconds <= 60 for a loss-weight change on the demo",
}


def target_met(part: str, r: dict) -> bool:
    """Whether one part of the report meets its target (TARGETS)."""
    if part == "extract":
        return r["speedup"] >= 15 and r["min_cosine"] >= 0.99
    if part == "train":
        return r["speedup"] >= 50
    if part == "loader":
        return all(v["fraction"] >= 0.5 for v in r.values())
    if part == "mining":
        return r["fraction_of_train"] <= 0.1
    if part == "index":
        big = r[max(r, key=int)]
        return big["ann_recall_at_10_vs_flat"] >= 0.95 and big["ann_qps"] >= 5 * big["flat_qps"]
    if part == "memory":
        return r["peak_rss_mb_4n"] <= 1.1 * r["peak_rss_mb_n"]
    if part == "stream":
        return r["window_ms_p95"] <= 240
    if part == "reexperiment":
        return r["train_seconds"] + r["eval_seconds"] <= 60
    raise KeyError(part)


def _g(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def format_table(report: dict, details: dict) -> str:
    """The printed summary: one block of rows per part, its target and whether it is met."""
    rows = []
    if "extract" in report:
        r, d = report["extract"], details.get("extract", {})
        rows.append(("extract", f"{d.get('chunks', '?')} chunks: seed {_g(r['seed_seconds'])} s, ours "
                     f"{_g(r['ours_seconds'])} s, speedup {_g(r['speedup'])}x, min cos {r['min_cosine']:.4f}"))
    if "train" in report:
        r, d = report["train"], details.get("train", {})
        est = f" (estimated from {d['online_batches']} batches)" if d.get("online_estimated") else ""
        cest = f" (estimated from {d['cached_batches']} batches)" if d.get("cached_estimated") else ""
        rows.append(("train", f"online_seconds{est} {_g(r['online_seconds'])}, cached_seconds{cest} "
                     f"{_g(r['cached_seconds'])} ({d.get('steps', '?')} steps), speedup {_g(r['speedup'])}x"))
        if "what_if_heads_only" in d:
            w = d["what_if_heads_only"]
            rows.append(("train", f"what-if heads only (audio_unfreeze=0): {_g(w['step_seconds'])} s/step, "
                         f"online {_g(w['online_seconds'])} s vs cached {_g(w['cached_seconds'])} s = "
                         f"{_g(w['speedup'])}x"))
    if "loader" in report:
        mode = details.get("loader", {}).get("mode", "")
        for fmt, r in report["loader"].items():
            disk = details.get("loader", {}).get(fmt, {})
            extra = (f"; item by item from disk {_g(disk['from_disk_per_item_mb_s'])} MB/s "
                     f"({disk['from_disk_fraction']:.2f})") if disk else ""
            rows.append(("loader", f"{fmt}: raw {_g(r['raw_mb_s'])} MB/s, loader ({mode}) {_g(r['loader_mb_s'])} "
                         f"MB/s, fraction {r['fraction']:.2f}{extra}"))
    if "mining" in report:
        r, d = report["mining"], details.get("mining", {})
        rows.append(("mining", f"{r['glossary_size']:,} terms x {d.get('chunks', '?')} chunks: refresh "
                     f"{_g(r['refresh_seconds'])} s, every {d.get('hard_refresh', '?')} steps of "
                     f"{_g(d.get('step_seconds', float('nan')))} s -> {r['fraction_of_train']:.3f} of training; "
                     f"{r.get('negatives_recall_vs_exact', float('nan')):.3f} of the exact negatives kept"))
    if "index" in report:
        for n, r in report["index"].items():
            f = details.get("index", {}).get(n, {})
            rows.append(("index", f"{int(n):,} x 512: Flat {_g(r['flat_qps'])} q/s, {f.get('ann_factory', 'ANN')} "
                         f"nprobe {f.get('nprobe', '?')} {_g(r['ann_qps'])} q/s "
                         f"({_g(r['ann_qps'] / r['flat_qps'])}x), recall@10 {r['ann_recall_at_10_vs_flat']:.3f}, "
                         f"build {_g(r['build_seconds'])} s"))
    if "memory" in report:
        r, d = report["memory"], details.get("memory", {})
        rows.append(("memory", f"peak RSS {_g(r['peak_rss_mb_n'])} MB at N={d.get('n', '?')} chunks/split, "
                     f"{_g(r['peak_rss_mb_4n'])} MB at 4N"))
    if "stream" in report:
        r, d = report["stream"], details.get("stream", {})
        rows.append(("stream", f"{d.get('glossary_terms', 0):,} terms, {d.get('audio_seconds', 0):.0f} s of audio in "
                     f"{d.get('block_ms', '?')} ms blocks: window p50 {_g(r['window_ms_p50'])} ms, p95 "
                     f"{_g(r['window_ms_p95'])} ms, real-time factor {r['real_time_factor']:.3f}"))
    if "reexperiment" in report:
        r, d = report["reexperiment"], details.get("reexperiment", {})
        rows.append(("reexperiment", f"{d.get('change', '?')}: trained in {_g(r['train_seconds'])} s "
                     f"({d.get('steps', '?')} steps, {d.get('epochs', '?')} epochs), evaluated on dev in "
                     f"{_g(r['eval_seconds'])} s: dev R@10 {r['dev_r10']:.3f}"))
    lines = [f"{'part':8s} {'met':4s} figures"]
    shown = set()
    for part, text in rows:
        met = "" if part in shown else ("yes" if target_met(part, report[part]) else "NO")
        shown.add(part)
        lines.append(f"{part:8s} {met:4s} {text}")
    lines.append("targets: " + "; ".join(f"{p} {t}" for p, t in TARGETS.items() if p in report))
    return "\n".join(lines)



def format_flops(rows: list[dict]) -> str:
    """The FLOPs calculation as a small table (GFLOP per second of audio)."""
    lines = ["CALCULATION (not a measurement), from Qwen2-Audio-7B's config: GFLOP per audio second",
             "  tower padded = audio tower on the chunk padded to 30 s; tower true = at true length;",
             "  LM true = what the language-model path adds over the chunk's 25 Hz audio tokens;",
             "  LM 750 = the same if all 750 padded audio tokens went through the LM",
             f"{'chunk':>6s} {'tower padded':>13s} {'tower true':>11s} {'ratio':>6s} {'LM true':>8s} {'LM 750':>8s}"]
    for r in rows:
        lines.append(f"{r['seconds']:5.1f}s {r['tower_padded_gflop_per_audio_s']:13,.0f} "
                     f"{r['tower_true_gflop_per_audio_s']:11,.1f} {r['tower_ratio']:5.1f}x "
                     f"{r['lm_true_tokens_gflop_per_audio_s']:8,.0f} {r['lm_750_tokens_gflop_per_audio_s']:8,.0f}")
    return "\n".join(lines)
