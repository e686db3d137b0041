"""Interruptions: the real commands killed with SIGKILL at random points, then rerun.

- extraction (a tiny random Qwen2-Audio saved to disk, loaded like any checkpoint): the resumed cache
  equals an uninterrupted one, no shard is half-written or counted twice;
- training: `--resume` ends on the same parameters and metrics as an uninterrupted run;
- evaluation: a rerun after a kill gives the same report.
After every kill, nothing on disk may look finished when it is not.

Kill points are random but tied to progress (the k-th finished shard / training step, then a random
moment more), so they land inside the work however fast or loaded the machine is. The seed of each
test is printed, so a failure can be replayed.
"""
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.cache import FeatureCache
from shared.config import load_config
from stage1_extract.extract import extract
from stage2_train.train import train
from stage3_index.evaluate import evaluate
from tests.synthetic import build_cache
from tests.test_extract import assert_same_cache, make_corpus

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("qps", "index_build_seconds")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread here and in the commands: the same thread count computes bit for bit the same, and for
    models this small a second thread only spins (10x slower on a busy 2-core machine)."""
    import faiss
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def quiet(*_):
    pass


def rng_for(name: str) -> random.Random:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"{name}: kill-point seed {seed}")
    return random.Random(seed)


# ---------------------------------------------------------------- running and killing the commands
#
# Each command runs in its own process, exactly as `python -m MODULE ARGS` (runpy), killed with a real
# SIGKILL. The processes are forked from a forkserver that imported torch and transformers once: a
# fresh interpreter per run would spend 5-10 s importing them, for seconds of work.

_PRELOAD = ["torch", "faiss", "transformers.models.qwen2_audio.modeling_qwen2_audio",
            "transformers.models.whisper.feature_extraction_whisper", "transformers.tokenization_utils_fast",
            "stage1_extract.cli", "stage1_extract.extract", "stage1_extract.backbones", "stage1_extract.prepare",
            "stage2_train.train", "stage3_index.cli", "stage3_index.evaluate", "matplotlib.pyplot"]


def _command_main(module: str, args: list[str], log: str, env: dict | None = None) -> None:
    """In the child: output to `log`, one thread, then `python -m module args`."""
    import runpy
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    import faiss
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def start(module: str, args: list[str], log: Path, env: dict | None = None):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    p = ctx.Process(target=_command_main, args=(module, [str(a) for a in args], str(log), env), daemon=True)
    p.start()
    return p


def run_to_end(module: str, args: list[str], log: Path, timeout: float = 300) -> None:
    p = start(module, args, log)
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
    assert p.exitcode == 0, log.read_text()[-3000:]


def run_and_kill(module: str, args: list[str], log: Path, trigger, jitter: float, rng: random.Random,
                 timeout: float = 300) -> int | None:
    """Start the command; once `trigger()` holds, wait a random moment in [0, jitter] s and SIGKILL it.
    Returns the pid it killed, or None when the command finished first (it must have succeeded)."""
    p = start(module, args, log)
    deadline = time.time() + timeout
    try:
        while not trigger():
            if not p.is_alive():
                p.join()
                assert p.exitcode == 0, log.read_text()[-3000:]
                return None
            assert time.time() < deadline, "the trigger never fired:\n" + log.read_text()[-3000:]
            time.sleep(0.002)
        time.sleep(rng.uniform(0, jitter))
        if not p.is_alive():
            p.join()
            assert p.exitcode == 0, log.read_text()[-3000:]
            return None
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        if p.exitcode == 0:                     # it finished just before the kill
            return None
        assert p.exitcode == -signal.SIGKILL, log.read_text()[-3000:]
        return p.pid
    finally:
        if p.is_alive():
            p.kill()
            p.join()


def assert_nothing_looks_finished_that_is_not(root: Path) -> None:
    """After a kill: every JSON parses, every shard marked done matches its checksum."""
    for p in root.rglob("*.json"):
        if not p.name.startswith(".") and "zarr.json" != p.name:
            json.loads(p.read_text())                    # no torn index, done mark, glossary or top file
    if (root / "index.json").is_file():
        cache = FeatureCache(root)
        problems = [b for b in cache.verify() if not b.endswith(": missing")]
        assert problems == [], problems


# ---------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-Audio with its tokenizer and feature extractor, saved like a hub checkpoint."""
    from transformers import WhisperFeatureExtractor
    from tests.tiny import tiny_bpe_tokenizer, tiny_qwen2audio_model
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2-audio"
    tiny_qwen2audio_model(layers=2).save_pretrained(out)
    tiny_bpe_tokenizer(["say alpha beta gamma delta 0 1 2 3"]).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return out


def test_extraction_killed_at_random_points_resumes_to_the_uninterrupted_cache(tmp_path, tiny_model_dir):
    rng = rng_for("extract")
    base = make_corpus(tmp_path, n_train=40, n_test=8)
    sets = [f"data.glossary={base.data.glossary}", "data.alt2main=", f"data.chunks={base.data.chunks}",
            f"cache.root={tmp_path / 'cache'}", "extract.shard_size=4", "extract.batch_seconds=6",
            "backbone.kind=qwen2audio", f"backbone.audio_model={tiny_model_dir}", "backbone.audio_unfreeze=1"]
    cfg = load_config(None, sets)
    ref = tmp_path / "uninterrupted"
    t0 = time.time()
    extract(cfg, out=ref, log=quiet)                       # the same checkpoint, loaded from disk
    reference = FeatureCache(ref)
    n_shards = sum(t.plan.shards for t in reference.tables.values())
    assert n_shards >= 12
    per_shard = (time.time() - t0) / n_shards              # kills land within ~1.5 shards of the trigger

    root = tmp_path / "cache/features/demo"
    cmd = ("stage1_extract", ["extract"] + [a for s in sets for a in ("--set", s)])
    log = tmp_path / "extract.log"

    def done() -> int:
        return len(list(root.glob("tables/*/*/*.done.json")))

    kills = []
    for _ in range(2):
        if done() + 1 > n_shards - 4:
            break
        k = rng.randint(done() + 1, n_shards - 4)          # wait for the k-th finished shard...
        pid = run_and_kill(*cmd, log, lambda: done() >= k, jitter=1.5 * per_shard, rng=rng)  # ...then a moment
        kills.append((k, done(), pid))
        if pid is None:
            break
        assert_nothing_looks_finished_that_is_not(root)
        lock = root / "locks/writer-0-of-1.lock"
        if lock.is_file():                                  # the dead writer's lock: the rerun takes it over
            assert json.loads(lock.read_text())["pid"] == pid
    print("kills (trigger, shards done after the kill, pid):", kills)
    assert kills[0][2] is not None, "the first run finished before it could be killed"
    run_to_end(*cmd, log)

    cache = FeatureCache(root)
    assert cache.complete() and cache.verify() == []
    assert cache.index["tables"] == reference.index["tables"]
    assert cache.index["backbone_fingerprint"] == reference.index["backbone_fingerprint"]
    for name, t in cache.tables.items():
        r = reference.table(name)
        # no shard counted twice: one done mark and one shard per planned shard, every id once
        assert len(list(t.dir.glob("*.done.json"))) == t.plan.shards
        assert len([p for p in t.dir.iterdir() if p.name.endswith(".zarr")]) == t.plan.shards
        assert not [p for p in t.dir.iterdir() if ".tmp-" in p.name]
        assert t.ids == r.ids and len(set(t.ids)) == len(t.ids) == t.plan.items
        fa, oa = t.load()
        fb, ob = r.load()
        np.testing.assert_array_equal(oa, ob)
        np.testing.assert_array_equal(fa, fb)
    for name in ("glossary.json", "chunk_texts.json", "top_audio.safetensors", "top_text.safetensors"):
        assert (root / name).read_bytes() == (ref / name).read_bytes(), name
    assert json.loads((root / "top_audio.json").read_text()) == json.loads((ref / "top_audio.json").read_text())


def test_two_ranks_write_the_same_cache_as_one(tmp_path, tiny_model_dir):
    """torchrun-style scale-out: two concurrent processes (RANK 0 and 1 of WORLD_SIZE 2) split the
    shards between them and together write exactly what one process writes."""
    base = make_corpus(tmp_path, n_train=24, n_test=8)
    sets = [f"data.glossary={base.data.glossary}", "data.alt2main=", f"data.chunks={base.data.chunks}",
            f"cache.root={tmp_path / 'cache'}", "extract.shard_size=4", "extract.batch_seconds=6",
            "backbone.kind=qwen2audio", f"backbone.audio_model={tiny_model_dir}", "backbone.audio_unfreeze=1"]
    one = tmp_path / "one"
    extract(load_config(None, sets), out=one, log=quiet)
    args = ["extract"] + [a for s in sets for a in ("--set", s)]
    procs = [start("stage1_extract", args, tmp_path / f"rank{r}.log", env={"RANK": str(r), "WORLD_SIZE": "2"})
             for r in range(2)]
    for r, p in enumerate(procs):
        p.join(300)
        assert p.exitcode == 0, (tmp_path / f"rank{r}.log").read_text()[-3000:]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert all("chunks=" in log for log in logs)           # both ranks did work
    assert_same_cache(one, tmp_path / "cache/features/demo")
    assert FeatureCache(tmp_path / "cache/features/demo").verify() == []


# ---------------------------------------------------------------- training and evaluation

TRAIN_SETS = {"train.epochs": 4, "train.batch_size": 16, "train.lr": 3e-3, "train.top_lr": 1e-3,
              "train.warmup_steps": 3, "train.hard_refresh": 4, "train.hard_k": 4, "train.proj_dim": 16,
              "train.in_memory": "yes", "eval.glossary_sizes": "20,30"}


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("interrupt"), n_terms=40, n_train=96, n_dev=24, n_test=24)


def _train_cmd(features: Path, run: Path, resume: bool) -> tuple[str, list[str]]:
    sets = [a for k, v in TRAIN_SETS.items() for a in ("--set", f"{k}={v}")]
    return "stage2_train", ["--features", features, "--run", run, *sets] + (["--resume"] if resume else [])


def _steps(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_text().count('"type": "step"')
    except FileNotFoundError:
        return 0


def test_training_killed_then_resumed_equals_uninterrupted(features, tmp_path):
    rng = rng_for("train")
    cfg = load_config(None, [f"{k}={v}" for k, v in TRAIN_SETS.items()])
    t0 = time.time()
    ref = train(cfg, features, tmp_path / "uninterrupted", log=quiet)
    total = ref.total_steps
    per_step = (time.time() - t0) / total                  # kills land within ~2 steps of the trigger
    assert total >= 16
    run, log = tmp_path / "run", tmp_path / "train.log"
    kills = []
    for i in range(2):
        if _steps(run) + 1 > total - 5:
            break
        k = rng.randint(_steps(run) + 1, total - 5)         # wait for the k-th step, then a moment more
        pid = run_and_kill(*_train_cmd(features, run, resume=i > 0), log, lambda: _steps(run) >= k,
                           jitter=2 * per_step, rng=rng)
        kills.append((k, _steps(run), pid))
        if pid is None:
            break
        for ckpt in ("last.pt", "best.pt"):                  # a checkpoint that exists is a whole one
            if (run / ckpt).is_file():
                torch.load(run / ckpt, weights_only=False)
    print("kills (trigger step, steps logged after the kill, pid):", kills)
    assert kills[0][2] is not None, "the first run finished before it could be killed"
    run_to_end(*_train_cmd(features, run, resume=True), log)

    for name in ("last.pt", "best.pt"):
        got = torch.load(run / name, weights_only=False)
        want = torch.load(tmp_path / "uninterrupted" / name, weights_only=False)
        assert got["state"] == want["state"], name
        assert got["model"].keys() == want["model"].keys()
        for key, value in want["model"].items():
            torch.testing.assert_close(got["model"][key], value, rtol=0, atol=0, msg=f"{name} {key}")
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "uninterrupted/metrics.jsonl").read_text()


@pytest.fixture(scope="module")
def trained_run(features, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = load_config(None, [f"{k}={v}" for k, v in {**TRAIN_SETS, "train.epochs": 2}.items()])
    train(cfg, features, run, log=quiet)
    return run


def _no_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMING_KEYS}


def test_eval_killed_then_rerun_gives_the_same_report(trained_run, tmp_path):
    rng = rng_for("eval")
    ref_run, run = tmp_path / "uninterrupted", tmp_path / "run"
    shutil.copytree(trained_run, ref_run)
    shutil.copytree(trained_run, run)
    evaluate(ref_run, log=quiet)
    cmd = ("stage3_index", ["eval", "--run", run, "--quiet"])
    log = tmp_path / "eval.log"
    out = run / "eval" / "test"
    triggers = [
        ("the index is saved", lambda: (out / "glossary.index.json").is_file(), 0.1),
        ("a random moment", lambda: True, rng.uniform(0.05, 1.5)),
    ]
    rng.shuffle(triggers)
    kills = []
    for what, trigger, jitter in triggers:
        pid = run_and_kill(*cmd, log, trigger, jitter, rng)
        kills.append((what, round(jitter, 2), pid, sorted(p.name for p in out.iterdir()) if out.is_dir() else []))
        if (out / "report.json").is_file():                  # a report that exists is a whole one,
            json.loads((out / "report.json").read_text())    # and written last: its figures are there too
            for name in ("report.md", "recall_at_k.png", "max_scores.png"):
                assert (out / name).is_file(), (name, kills)
    print("kills (trigger, jitter, pid, files after the kill):", kills)
    assert any(pid is not None for _, _, pid, _ in kills), "eval finished before every kill"
    run_to_end(*cmd, log)
    written = sorted(p.name for p in (ref_run / "eval" / "test").glob("*.json") if not p.name.startswith("glossary"))
    assert "report.json" in written
    for name in written:                        # report.json (and whatever else eval writes as JSON)
        got, want = (json.loads((r / "eval" / "test" / name).read_text()) for r in (run, ref_run))
        assert _no_timing(got) == _no_timing(want), name
    for name in ("report.md", "recall_at_k.png", "max_scores.png", "glossary.index"):
        assert (out / name).is_file()
