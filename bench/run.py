"""`make bench` / `python -m bench`: run the chosen parts, write report.json and details.json, print the table."""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import click

from shared.cli import config_options
from shared.config import Config
from bench.common import ENCODER_THREADS, QWEN2_AUDIO_LM, QWEN2_AUDIO_TOWER, TrainSetup, _frozen_backbone, _require_inputs, flops_table
from bench.extract import bench_extract
from bench.index import bench_index
from bench.loader import bench_loader
from bench.memory import bench_memory
from bench.mining import bench_mining
from bench.reexperiment import bench_reexperiment
from bench.report import TARGETS, format_flops, format_table, target_met
from bench.stream import bench_stream
from bench.train import bench_train, cached_epoch
from shared.errors import BadInput


# ---------------------------------------------------------------- the command

PARTS = ("extract", "train", "loader", "mining", "index", "memory", "stream", "reexperiment")   # the order of the README's table


def run_bench(cfg: Config, out: str | Path, *, quick: bool = False, parts=PARTS, config_path: str | None = None,
              overrides=(), run: str | Path = "cache/runs/demo", log=print) -> tuple[dict, dict]:
    """Run the chosen parts; write OUT/report.json and OUT/details.json; return both."""
    import faiss
    import torch
    torch.set_num_threads(ENCODER_THREADS)
    faiss.omp_set_num_threads(ENCODER_THREADS)
    t_all = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, features = _require_inputs(cfg)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise BadInput(f"unknown bench parts {sorted(unknown)}", fix=f"choose from {', '.join(PARTS)}")
    size = {"extract_chunks": 200, "cached_budget_s": 40.0, "glossary": 100_000, "index": [100_000, 1_000_000],
            "queries": 10_000, "exact_queries": {100_000: 2000, 1_000_000: 300}, "memory_n": 16,
            "stream_terms": 10_000, "stream_seconds": 60.0}
    if quick:
        size = {"extract_chunks": 16, "cached_budget_s": 5.0, "glossary": 10_000, "index": [10_000, 100_000],
                "queries": 1000, "exact_queries": {100_000: 300}, "memory_n": 4,
                "stream_terms": 1000, "stream_seconds": 10.0}
        cfg = copy.deepcopy(cfg)
        cfg.train.limit, cfg.train.batch_size = 64, 16
    report, details = {}, {"quick": quick, "sizes": {k: v for k, v in size.items() if k != "exact_queries"},
                           "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(),
                           "features": str(features), "manifest": str(manifest), "seconds": {}}
    details["sizes"]["exact_queries"] = {str(k): v for k, v in size["exact_queries"].items()}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        r = fn(*a)
        details["seconds"][name] = round(time.perf_counter() - t0, 1)
        return r

    if {"extract", "train", "mining"} & set(parts):
        t0 = time.perf_counter()
        backbone = _frozen_backbone(cfg)
        setup = TrainSetup(cfg, features, out, backbone)
        details["seconds"]["setup"] = round(time.perf_counter() - t0, 1)
        earlier = None
        if "train" in parts and "extract" in parts:
            earlier = timed("train_before", cached_epoch, setup, size["cached_budget_s"], "before")
        if "extract" in parts:
            report["extract"], details["extract"] = timed("extract", bench_extract, cfg, backbone, setup,
                                                          size["extract_chunks"], log)
        if "train" in parts:
            report["train"], details["train"] = timed("train", bench_train, cfg, backbone, setup,
                                                      size["cached_budget_s"], log, earlier)
        if "mining" in parts:
            report["mining"], details["mining"] = timed("mining", bench_mining, cfg, setup, size["glossary"], log,
                                                        run, features, out)
        del setup, backbone
    if "loader" in parts:
        report["loader"], details["loader"] = timed("loader", bench_loader, cfg, features, out, log)
    if "index" in parts:
        report["index"], details["index"] = timed("index", bench_index, size["index"], size["queries"],
                                                  size["exact_queries"], 512, log)
    if "memory" in parts:
        report["memory"], details["memory"] = timed("memory", bench_memory, config_path, list(overrides), out,
                                                    size["memory_n"], log)
    if "stream" in parts:
        report["stream"], details["stream"] = timed("stream", bench_stream, cfg, run, out, size["stream_terms"],
                                                    size["stream_seconds"], log)
    if "reexperiment" in parts:
        report["reexperiment"], details["reexperiment"] = timed("reexperiment", bench_reexperiment, cfg, features,
                                                                out, quick, log)
    details["load_average_at_end"] = os.getloadavg()
    report = {p: report[p] for p in PARTS if p in report}
    details["targets"] = {p: {"target": TARGETS[p], "met": target_met(p, report[p])} for p in report}
    details["flops_calculation"] = {"note": "CALCULATION from Qwen2-Audio-7B's config, not a measurement",
                                    "tower": QWEN2_AUDIO_TOWER, "lm": QWEN2_AUDIO_LM, "rows": flops_table()}
    details["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=1) + "\n")
    return report, details



@click.command("bench")
@config_options
@click.option("--out", default="cache/bench", show_default=True, type=click.Path(file_okay=False),
              help="Where report.json and details.json go (and the throwaway caches).")
@click.option("--quick", is_flag=True,
              help="A tiny version of every part (a smoke test of a few minutes; its figures mean little).")
@click.option("--only", default=",".join(PARTS), show_default=True,
              help="Comma-separated parts to run.")
@click.option("--run", default="cache/runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="The trained run the stream part loads.")
def bench_command(cfg: Config, out, quick, only, run):
    """Measure the design's promises against the seed's way: extract, train, loader, mining, index,
    memory. Needs the demo's manifests and feature cache (run make first). Writes OUT/report.json."""
    ctx = click.get_current_context()
    parts = tuple(p.strip() for p in only.split(",") if p.strip())
    report, details = run_bench(cfg, out, quick=quick, parts=parts, config_path=ctx.params.get("config_path"),
                                overrides=ctx.params.get("overrides", ()), run=run, log=click.echo)
    click.echo("")
    click.echo(format_table(report, details))
    click.echo("")
    click.echo(format_flops(details["flops_calculation"]["rows"]))
    click.echo(f"\nwrote {Path(out) / 'report.json'} and details.json in {details['seconds']['total']:.0f} s")

