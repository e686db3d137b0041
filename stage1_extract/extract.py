"""`extract`: run the frozen backbone once over every chunk and glossary term; fill the cache.

Work is cut into tasks (table, shard). Writer i of n (a torchrun rank or a SLURM array task)
owns tasks i, i+n, i+2n, ...; a shard already marked done is skipped, so a killed run resumes
where it stopped and two writers never touch the same shard. When nothing is left to do the
model is not even loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from shared.audio import read_audio
from shared.cache import FeatureCache, TablePlan, WriterLock, file_sha256, fingerprint_diff, live_locks
from shared.cli import config_options, figures
from shared.config import Config, save_config
from shared.errors import BadInput, RejectLog
from shared.glossary import Glossary, load_glossary
from shared.manifest import Chunk, read_chunks

SPLITS = ("train", "dev", "test")


def features_dir(cfg: Config) -> Path:
    return Path(cfg.cache.root) / "features" / cfg.cache.name


def find_manifests(chunks_dir: str | Path) -> dict[str, Path]:
    """{split: manifest} from a prepare output folder: train/dev/test.jsonl when there are any,
    else every other `<name>.jsonl` (a one-split corpus, e.g. heldout.jsonl; chunks.jsonl is
    split "all"). prepare's rejected.jsonl is never a manifest."""
    d = Path(chunks_dir)
    found = {s: d / f"{s}.jsonl" for s in SPLITS if (d / f"{s}.jsonl").is_file()}
    if not found and d.is_dir():
        found = {("all" if p.stem == "chunks" else p.stem): p for p in sorted(d.glob("*.jsonl"))
                 if p.is_file() and p.stem != "rejected" and not p.name.startswith(".")}
    if not found:
        raise BadInput("no chunk manifests (train/dev/test.jsonl, <split>.jsonl or chunks.jsonl)",
                       file=d, fix="run `python -m stage1_extract prepare` first (make data)")
    return found


def duration_batches(durations: list[float], batch_seconds: float) -> list[list[int]]:
    """Indices grouped so that (items x longest item) stays under batch_seconds.

    Sorting by duration first means a batch holds chunks of similar length, so little compute is
    spent on padding inside the batch.
    """
    order = sorted(range(len(durations)), key=lambda i: durations[i])
    batches, cur, longest = [], [], 0.0
    for i in order:
        d = durations[i]
        if cur and max(longest, d) * (len(cur) + 1) > batch_seconds:
            batches.append(cur)
            cur, longest = [], 0.0
        cur.append(i)
        longest = max(longest, d)
    if cur:
        batches.append(cur)
    return batches


def cache_fingerprint(cfg: Config, manifests: dict[str, Path]) -> dict:
    """What the cached features depend on, computable without loading the model."""
    b = asdict(cfg.backbone)
    b.pop("device")  # where it ran does not change what it computes (dtype does)
    gl = hashlib.sha256()
    for p in (cfg.data.glossary, cfg.data.alt2main):
        if p and Path(p).is_file():
            gl.update(file_sha256(p).encode())
    return {"backbone": b, "text_field": cfg.data.text_field,
            "feature_settings": {"sample_rate": 16000, "max_chunk_seconds": cfg.extract.max_chunk_seconds},
            "limit": cfg.extract.limit, "glossary_sha256": gl.hexdigest(),
            "manifests": {s: file_sha256(p) for s, p in sorted(manifests.items())}}


def _load_inputs(cfg: Config, skip_bad: bool, rejects: RejectLog, log) -> tuple[Glossary, dict, list[str]]:
    gloss = load_glossary(cfg.data.glossary, cfg.data.alt2main or None, log=log)
    manifests = find_manifests(cfg.data.chunks)
    chunks = {}
    for split, path in manifests.items():
        items = read_chunks(path, gloss, skip_bad=skip_bad, rejects=rejects)
        if cfg.extract.limit:
            items = items[: cfg.extract.limit]
        if not items:
            raise BadInput(f"split {split!r} is empty", file=path, fix="check prepare's output")
        chunks[split] = items
    texts = sorted({c.term_chunk_text for items in chunks.values() for c in items})
    return gloss, chunks, texts


def _writer_slot(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    if shard_index is not None or num_shards is not None:
        n = num_shards or 1
        i = shard_index or 0
        if not 0 <= i < n:
            raise BadInput(f"--shard-index {i} outside 0..{n - 1}")
        return i, n
    # torchrun sets these; every rank takes its own tasks, no process group needed.
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _read_chunk_audio(c: Chunk, max_seconds: float) -> np.ndarray:
    if c.audio_duration is not None and c.audio_duration > max_seconds:
        raise BadInput(f"chunk {c.id!r} is {c.audio_duration:.1f}s long: rejected, the audio encoder "
                       f"takes at most {max_seconds:.0f}s", file=c.audio, record=c.id,
                       fix="cut it into shorter chunks (prepare with a smaller data.context)")
    wav = read_audio(c.audio, c.audio_offset, c.audio_duration, record=f"chunk {c.id}", channels=c.channel)
    if len(wav) > max_seconds * 16000:
        raise BadInput(f"chunk {c.id!r} is {len(wav) / 16000:.1f}s long: rejected, the audio encoder takes "
                       f"at most {max_seconds:.0f}s", file=c.audio, record=c.id,
                       fix="cut it into shorter chunks")
    return wav


def return_freed_memory() -> bool:
    """Have glibc give freed heap memory back to the system at once (M_TRIM_THRESHOLD = 0, what the
    MALLOC_TRIM_THRESHOLD_=0 environment variable does). Each shard's audio, mel and states are freed
    after it is written, but glibc keeps freed heap pages by default, so the peak RSS crept up with the
    corpus (+12% from N to 4N chunks, `make bench`); with this it stays flat. False where there is no
    glibc (macOS, musl): nothing changes there."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-1, 0))           # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def extract(cfg: Config, *, out: str | Path | None = None, shard_index: int | None = None,
            num_shards: int | None = None, skip_bad: bool = False, force: bool = False,
            backbone=None, log=print) -> dict:
    """Fill (or finish) the feature cache for cfg; return the figures of this run."""
    t0 = time.time()
    return_freed_memory()
    root = Path(out) if out else features_dir(cfg)
    rejects = RejectLog(None)
    gloss, chunks, texts = _load_inputs(cfg, skip_bad, rejects, log)
    manifests = find_manifests(cfg.data.chunks)
    fp = cache_fingerprint(cfg, manifests)
    if force and (root / "index.json").is_file():
        old = json.loads((root / "index.json").read_text())
        diff = fingerprint_diff(old["fingerprint"], json.loads(json.dumps(fp)))
        if not diff and "backbone_fingerprint" in old:
            # same settings, but the model itself may have changed (new weights in the same folder)
            backbone = backbone or _load_backbone(cfg)
            diff = fingerprint_diff(old["backbone_fingerprint"], json.loads(json.dumps(backbone.fingerprint(), default=str)))
        if diff:
            aside = root.with_name(f"{root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            root.rename(aside)
            log(f"--force: moved the old cache aside to {aside}")
    size = cfg.extract.shard_size
    plans = {f"audio/{s}": TablePlan(len(c), size) for s, c in chunks.items()}
    plans["text/glossary"] = TablePlan(len(gloss), size * 4)
    plans["text/chunks"] = TablePlan(len(texts), size * 4)
    # pseudo-term targets (prepare's data.pseudo_ratio) are embedded like glossary terms
    pseudo = sorted({p for items in chunks.values() for c in items for p in c.pseudo_terms})
    if pseudo:
        plans["text/pseudo"] = TablePlan(len(pseudo), size * 4)
    index, n_writers = _writer_slot(shard_index, num_shards)
    with WriterLock(root / "locks" / f"writer-{index}-of-{n_writers}.lock"):
        # writers split the shards by (index, n): one with another n would write some of the same shards
        for path, owner in live_locks(root / "locks").items():
            if not path.name.endswith(f"-of-{n_writers}.lock"):
                raise BadInput(f"another extraction with a different --num-shards is writing here ({path.stem}: "
                               f"host {owner.get('host')}, pid {owner.get('pid')})", file=root,
                               fix="wait for it to finish; all writers of one cache must use the same --num-shards")
        cache = FeatureCache.create(
            root, fingerprint=fp, tables=plans, fmt=cfg.cache.format, dtype=cfg.cache.dtype,
            dims={"audio": 0, "text": 0},
            extra={"manifests": {s: str(Path(p).resolve()) for s, p in manifests.items()},
                   "glossary": str(Path(cfg.data.glossary).resolve())})
        # eval's glossary-size distractors: a table with a fingerprint of its own (never the audio's)
        from shared.distractors import TABLE, ensure_table
        cache = ensure_table(cache, cfg.data.distractors, cfg.data.n_distractors,
                             list(gloss.keys) + list(gloss.aliases), size * 4, log)
        if TABLE in cache.tables:
            plans[TABLE] = cache.table(TABLE).plan
        tasks = [(name, k) for name in sorted(plans) for k in range(plans[name].shards)]
        mine = tasks[index::n_writers]
        for name in plans:
            cache.table(name).clean_leftovers() if n_writers == 1 else None
        todo = [(n, k) for n, k in mine if not cache.table(n).is_done(k)]
        if not todo:
            done, total = sum(d for d, _ in cache.status().values()), sum(n for _, n in cache.status().values())
            log(f"cache {root} is complete for writer {index}/{n_writers} ({done}/{total} shards done): nothing to do")
            _write_forms(cache, cfg, log)
            return {"chunks": 0, "shards": 0, "complete": cache.complete()}
        if cfg.extract.threads:
            import torch
            torch.set_num_threads(cfg.extract.threads)
        if backbone is None:
            backbone = _load_backbone(cfg)
        _check_backbone(cache, backbone)
        if not (root / "top_audio.json").is_file() or not (root / "top_text.json").is_file():
            backbone.export_top("audio", root)
            backbone.export_top("text", root)
        if not (root / "glossary.json").is_file() or not (root / "chunk_texts.json").is_file():
            cache.write_json("glossary.json", {"keys": gloss.keys, "aliases": gloss.aliases,
                                               "texts": gloss.texts(cfg.data.text_field),
                                               "text_field": cfg.data.text_field, "source": gloss.source})
            cache.write_json("chunk_texts.json", texts)
        if pseudo and not (root / "pseudo.json").is_file():
            cache.write_json("pseudo.json", pseudo)      # text/pseudo's items, in table order
        n_manifest_rejects = len(rejects)
        stats = _run_tasks(cfg, cache, backbone, todo, chunks, gloss, texts, skip_bad, log)
        _write_rejects(cache, rejects)
        _write_forms(cache, cfg, log)
    wall = time.time() - t0
    size_mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2 ** 20
    stats.update(wall_seconds=round(wall, 2), cache_mb=round(size_mb, 1), complete=cache.complete())
    log(figures(chunks=stats["chunks"], audio_hours=stats["audio_seconds"] / 3600, texts=stats["texts"],
                rejected=stats["rejected"], wall_s=wall,
                audio_s_per_s=stats["audio_seconds"] / max(stats["model_seconds"], 1e-9),
                cache_mb=size_mb))
    if rejects.items:
        log(f"--skip-bad: {n_manifest_rejects} manifest records and {len(rejects) - n_manifest_rejects} chunks "
            f"with bad audio skipped, each listed with its reason in {rejects.path}")
    save_config(cfg, root / "config.json")
    return stats


def _write_forms(cache: FeatureCache, cfg: Config, log) -> None:
    """Spellings and pronunciations of every cached text (the text side's form parts read them)."""
    if cache.complete():
        from shared.termside import write_forms
        write_forms(cache, cfg.text.g2p, log=log)


def _load_backbone(cfg: Config):
    from stage1_extract.backbones import load_backbone
    try:
        return load_backbone(cfg.backbone)
    except ValueError as e:  # a backbone setting that cannot work: a config error, not a crash
        raise BadInput(str(e), file="config [backbone]", fix="fix that backbone.* setting (--config / --set)") from None


def _write_rejects(cache: FeatureCache, rejects: RejectLog) -> None:
    """rejected.jsonl beside the cache: the manifest records skipped on reading, then the chunks whose
    audio was skipped in every finished shard (the writer that finishes last sees them all)."""
    for name in sorted(cache.tables):
        t = cache.table(name)
        for k in range(t.plan.shards):
            if t.is_done(k):
                for r in json.loads(t.done_path(k).read_text(encoding="utf-8")).get("rejected", []):
                    rejects.add(r["reason"], id=r["id"], table=name)
    rejects.path = cache.root / "rejected.jsonl"
    rejects.write()


def _check_backbone(cache: FeatureCache, backbone) -> None:
    """The model's own fingerprint (revision, weights hash) must match the one the cache started with;
    the dims of the tables follow the model."""
    fp = json.loads(json.dumps(backbone.fingerprint(), default=str))
    idx_path = cache.root / "index.json"
    index = json.loads(idx_path.read_text())
    if "backbone_fingerprint" in index:
        diff = fingerprint_diff(index["backbone_fingerprint"], fp)
        if diff:
            raise BadInput("the backbone differs from the one this cache was started with: " + "; ".join(diff),
                           file=cache.root, fix="use another cache.name, or --force to start afresh")
        return
    index["backbone_fingerprint"] = fp
    index["dims"] = {"audio": int(backbone.audio_dim), "text": int(backbone.text_dim)}
    from shared.cache import _write_json_atomic
    _write_json_atomic(idx_path, index)
    cache.index = index


def _run_tasks(cfg, cache, backbone, todo, chunks, gloss, texts, skip_bad, log) -> dict:
    text_items = {"text/glossary": gloss.texts(cfg.data.text_field), "text/chunks": texts}
    if "text/distractors" in cache.tables:
        text_items["text/distractors"] = cache.read_json("distractors.json")
    if "text/pseudo" in cache.tables:
        text_items["text/pseudo"] = cache.read_json("pseudo.json")
    audio_todo = [(n, k) for n, k in todo if n.startswith("audio/")]
    total_s = sum(c.audio_duration or 0.0 for n, k in audio_todo
                  for c in chunks[n.split("/", 1)[1]][slice(*cache.table(n).plan.bounds(k))])
    stats = {"chunks": 0, "texts": 0, "audio_seconds": 0.0, "model_seconds": 0.0, "rejected": 0, "shards": 0}
    text_todo = [(n, k) for n, k in todo if n.startswith("text/")]
    tbar = tqdm(total=sum(len(range(*cache.table(n).plan.bounds(k))) for n, k in text_todo),
                desc="extract text", unit="text", mininterval=1.0, disable=not text_todo)
    for name, k in text_todo:
        lo, hi = cache.table(name).plan.bounds(k)
        items = text_items[name][lo:hi]
        feats = []
        for b in range(0, len(items), cfg.extract.text_batch):
            feats += backbone.text_features(items[b:b + cfg.extract.text_batch])
            tbar.update(len(items[b:b + cfg.extract.text_batch]))
        cache.table(name).write_shard(k, [str(i) for i in range(lo, hi)], feats)
        stats["texts"] += len(items)
        stats["shards"] += 1
    tbar.close()
    bar = tqdm(total=round(total_s), desc="extract audio", unit="audio-s", mininterval=1.0)
    pool = ThreadPoolExecutor(max_workers=2)
    t_start = time.time()

    def load(task):
        name, k = task
        split = name.split("/", 1)[1]
        lo, hi = cache.table(name).plan.bounds(k)
        out = []
        for c in chunks[split][lo:hi]:
            try:
                out.append((c, _read_chunk_audio(c, cfg.extract.max_chunk_seconds), None))
            except BadInput as e:
                out.append((c, None, e))
        return out

    # Read the next shard's audio while the model encodes this one.
    futures = [pool.submit(load, t) for t in audio_todo[:2]]
    for i, (name, k) in enumerate(audio_todo):
        loaded = futures[i].result()
        futures[i] = None  # drop the done shard's audio: memory must not grow with the corpus
        if i + 2 < len(audio_todo):
            futures.append(pool.submit(load, audio_todo[i + 2]))
        good, rejected = [], []
        for c, wav, err in loaded:
            if err is not None:
                if not skip_bad:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise err
                rejected.append({"id": c.id, "reason": str(err)})
                continue
            good.append((c, wav))
        feats: list = [None] * len(good)
        tm = time.time()
        for batch in duration_batches([len(w) / 16000 for _, w in good], cfg.extract.batch_seconds):
            out = backbone.audio_features([good[j][1] for j in batch])
            for j, f in zip(batch, out):
                feats[j] = f
        stats["model_seconds"] += time.time() - tm
        cache.table(name).write_shard(k, [c.id for c, _ in good], feats, rejected)
        secs = sum(len(w) for _, w in good) / 16000
        stats["chunks"] += len(good)
        stats["rejected"] += len(rejected)
        stats["audio_seconds"] += secs
        stats["shards"] += 1
        bar.update(round(secs + sum(c.audio_duration or 0 for c, w, e in loaded if e is not None)))
        bar.set_postfix(chunks_s=f"{stats['chunks'] / max(time.time() - t_start, 1e-9):.1f}")
        for r in rejected:
            log(f"skipped chunk {r['id']}: {r['reason']}")
    bar.close()
    pool.shutdown()
    return stats


def verify(path: str | Path, log=print) -> list[str]:
    cache = FeatureCache(path)
    bad = cache.verify()
    for b in bad:
        log(f"bad shard: {b}")
    status = cache.status()
    log(f"{path}: {sum(d for d, _ in status.values())}/{sum(n for _, n in status.values())} shards done, "
        f"{len(bad)} bad")
    return bad


@click.command("extract")
@config_options
@click.option("--out", type=click.Path(file_okay=False), help="Cache folder. [cache.root/features/cache.name]")
@click.option("--shard-index", type=int, default=None,
              help="This writer's index (SLURM array task id); torchrun's RANK is used when unset.")
@click.option("--num-shards", type=int, default=None,
              help="How many writers share the work (SLURM array size); torchrun's WORLD_SIZE when unset.")
@click.option("--skip-bad", is_flag=True, help="Skip chunks with bad audio (recorded in the shard and printed) instead of stopping.")
@click.option("--force", is_flag=True, help="If the cache was built with other settings, move it aside and start afresh.")
def extract_command(cfg: Config, out, shard_index, num_shards, skip_bad, force):
    """Run the frozen backbone once over all chunks, glossary terms and chunk texts; cache the states.

    Reads the manifests in data.chunks and the glossary in data.glossary; writes
    cache.root/features/cache.name in cache.format (zarr | hdf5). Rerunning finishes what is left.
    """
    extract(cfg, out=out, shard_index=shard_index, num_shards=num_shards, skip_bad=skip_bad, force=force,
            log=click.echo)


@click.command("verify")
@click.argument("name")
@click.option("--root", default="cache", show_default=True, help="Cache root; NAME may also be a path.")
def verify_command(name, root):
    """Check every shard of cache NAME against its checksum; list missing or corrupted shards."""
    path = Path(name) if Path(name).is_dir() else Path(root) / "features" / name
    bad = verify(path, log=click.echo)
    if bad:
        raise click.exceptions.Exit(1)
