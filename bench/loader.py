"""loader: the training data path's MB/s against a plain read of the same shard files."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from shared.config import Config
from shared.errors import BadInput


def _read_sequentially(paths: list[Path]) -> tuple[int, float]:
    """A plain read: every file front to back into one buffer that holds them all, as the table must end
    up in memory for in-memory training (what any reader must at least do). One fresh buffer for both
    ways: reads into small arrays freed one after another get already-mapped pages back from malloc, a
    cost a loader that keeps the data cannot avoid, and the comparison would measure the allocator."""
    sizes = [p.stat().st_size for p in paths]
    t0 = time.perf_counter()
    buf = np.empty(sum(sizes), dtype=np.uint8)
    pos = 0
    for p, n in zip(paths, sizes):
        with open(p, "rb") as f:
            f.readinto(memoryview(buf[pos:pos + n]))
        pos += n
    return pos, time.perf_counter() - t0


def _shard_files(table) -> list[Path]:
    files = []
    for k in range(table.plan.shards):
        p = table.shard_path(k)
        files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return files


def hdf5_copy(features: Path, root: Path, table_name: str = "audio/train") -> Path:
    """The table re-written as HDF5 shards (same items, same ids) through the cache's own writer."""
    from shared.cache import FeatureCache
    src = FeatureCache(features)
    t = src.table(table_name)
    shas = [m["sha256"] for m in t.meta()]
    fp = {"copy_of": str(features), "table": table_name, "shards_sha256": shas}
    try:
        dst = FeatureCache.create(root, fingerprint=fp, tables={table_name: t.plan}, dims=src.index["dims"],
                                  fmt="hdf5", dtype=src.index["dtype"])
    except BadInput:  # the demo cache changed since the last copy: start over
        shutil.rmtree(root)
        dst = FeatureCache.create(root, fingerprint=fp, tables={table_name: t.plan}, dims=src.index["dims"],
                                  fmt="hdf5", dtype=src.index["dtype"])
    out = dst.table(table_name)
    for k in range(t.plan.shards):
        if not out.is_done(k):
            r = t.reader(k)
            frames, offsets = r.frames_all(), r.offsets
            items = [frames[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
            out.write_shard(k, t.meta()[k]["ids"], items)
    src.close()
    return root


def _loader_pass(root: Path, table_name: str, batches: list, in_memory: bool) -> tuple[int, float]:
    """One epoch of the training data path: Ragged as SplitData builds it, items read batch by batch."""
    from shared.cache import FeatureCache
    from stage2_train.data import Ragged
    t0 = time.perf_counter()
    cache = FeatureCache(root)
    ragged = Ragged(cache.table(table_name), in_memory)
    nbytes = 0
    for b in batches:
        for x in ragged.items(b):
            nbytes += x.nbytes
    seconds = time.perf_counter() - t0
    cache.close()
    return nbytes, seconds


def bench_loader(cfg: Config, features: Path, out: Path, log, repeats: int = 3) -> tuple[dict, dict]:
    from shared.cache import FeatureCache
    from stage2_train.data import SplitData, global_batches, want_in_memory
    cache = FeatureCache(features)
    split = SplitData(cache, "train", in_memory="no")
    t = cfg.train
    batches = global_batches(split.terms, len(split), t.batch_size, t.seed, 0, t.term_cap)
    table_bytes = cache.table("audio/train").nbytes()
    in_memory = want_in_memory(t.in_memory, table_bytes)
    roots = {cache.format: features}
    other = "hdf5" if cache.format == "zarr" else "zarr"
    if other == "hdf5":
        roots["hdf5"] = hdf5_copy(features, out / "hdf5_copy")
    else:
        log("loader: the demo cache is hdf5; the zarr figure is left out (no zarr copy is made)")
    cache.close()
    report, details = {}, {"mode": "in memory" if in_memory else "from disk",
                           "table": "audio/train", "table_mb": round(table_bytes / 2 ** 20, 1)}
    for fmt, root in sorted(roots.items(), key=lambda kv: kv[0] != "zarr"):
        table = FeatureCache(root).table("audio/train")
        files = _shard_files(table)
        _read_sequentially(files)                                   # warm the page cache for both ways
        raw = min((_read_sequentially(files) for _ in range(repeats)), key=lambda r: r[1])
        main = min((_loader_pass(root, "audio/train", batches, in_memory) for _ in range(repeats)),
                   key=lambda r: r[1])
        disk = _loader_pass(root, "audio/train", batches, False)    # per-item reads: the TB-scale path
        raw_mb_s = raw[0] / raw[1] / 2 ** 20
        loader_mb_s = main[0] / main[1] / 2 ** 20
        disk_mb_s = disk[0] / disk[1] / 2 ** 20
        report[fmt] = {"raw_mb_s": round(raw_mb_s, 1), "loader_mb_s": round(loader_mb_s, 1),
                       "fraction": round(loader_mb_s / raw_mb_s, 3)}
        details[fmt] = {"files": len(files), "file_mb": round(raw[0] / 2 ** 20, 1),
                        "from_disk_per_item_mb_s": round(disk_mb_s, 1),
                        "from_disk_fraction": round(disk_mb_s / raw_mb_s, 3),
                        "from_disk_ms_per_item": round(1000 * disk[1] / len(split), 3)}
        log(f"loader {fmt}: raw {raw_mb_s:.0f} MB/s, training path ({details['mode']}) {loader_mb_s:.0f} MB/s "
            f"-> {loader_mb_s / raw_mb_s:.2f}; item by item from disk {disk_mb_s:.0f} MB/s "
            f"({1000 * disk[1] / len(split):.2f} ms/item)")
    details["what"] = ("loader = one epoch in training order (global_batches, epoch 0) through stage2_train.data."
                       "Ragged as SplitData builds it for this config (train.in_memory=auto -> "
                       f"{details['mode']}): its construction (bulk shard reads, concatenation) plus every item "
                       "read; from_disk = the same with per-item reads (what a cache larger than memory gets); "
                       "raw = the same shard files read whole with np.fromfile; page cache warm for all (files "
                       f"read once before timing); best of {repeats}")
    return report, details
