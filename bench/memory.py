"""memory: peak RSS of extraction on N and 4N chunks, each in a fresh child process."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ENCODER_THREADS


def _run_memory_child(cfg_path: str | None, overrides: list[str], out: Path) -> float:
    """Peak RSS (MB) of one extraction, in a fresh process: RUSAGE_SELF of the child, reported by it."""
    shutil.rmtree(out, ignore_errors=True)
    args = json.dumps({"config": cfg_path, "overrides": overrides, "out": str(out)})
    proc = subprocess.run([sys.executable, "-m", "bench", "memory-child", args],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                               "TOKENIZERS_PARALLELISM": "false"})
    shutil.rmtree(out, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"peak_rss_kb\"")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the extraction child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])["peak_rss_kb"] / 1024


def bench_memory(cfg_path: str | None, overrides: list[str], out: Path, n: int, log) -> tuple[dict, dict]:
    shard = max(1, n // 2)
    peaks, seconds = {}, {}
    for label, limit in (("n", n), ("4n", 4 * n)):
        log(f"memory: extracting {limit} chunks per split (shards of {shard}) in a child process ...")
        t0 = time.perf_counter()
        peaks[label] = _run_memory_child(cfg_path, [*overrides, f"extract.limit={limit}",
                                                    f"extract.shard_size={shard}"], out / f"memory_{label}")
        seconds[label] = round(time.perf_counter() - t0, 1)
    report = {"peak_rss_mb_n": round(peaks["n"], 1), "peak_rss_mb_4n": round(peaks["4n"], 1)}
    details = {"n": n, "shard_size": shard, "child_seconds": seconds,
               "what": "python -m stage1_extract's extract() in a fresh child per run, extract.limit = N and 4N "
                       "chunks per split (all three splits, plus the glossary and chunk texts), shards of N/2 "
                       "chunks, into throwaway caches under the bench folder; peak = the child's VmHWM"}
    log(f"memory: peak RSS {peaks['n']:.0f} MB at N={n}, {peaks['4n']:.0f} MB at 4N={4 * n}")
    return report, details


def _memory_child(arg: str) -> None:
    import torch
    torch.set_num_threads(ENCODER_THREADS)
    from shared.config import load_config
    from stage1_extract.extract import extract
    a = json.loads(arg)
    cfg = load_config(a["config"], a["overrides"])
    extract(cfg, out=a["out"], force=True, log=lambda *x: None)
    print(json.dumps({"peak_rss_kb": peak_rss_kb()}), flush=True)


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's RSS at
    fork into a child's ru_maxrss across exec, so a child of a big parent would report the parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc (macOS: bytes, not kB)
