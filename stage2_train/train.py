"""The training loop on cached features: single process or torchrun (gloo on CPU, nccl on GPU).

Only the audio side is split across ranks (it carries the frames and the top layers); every
rank embeds the text side of the whole global batch (term columns, chunk texts, mined hard
negatives), which is cheap. Audio embeddings are all-gathered with gradient and gradients are
averaged, so one step on K ranks of batch B equals one step on one rank of batch K*B.

Hard negatives: every `hard_refresh` steps the glossary is re-embedded with the current text
side and searched (FAISS) with the latest audio embedding of every training chunk (kept from
the steps that saw it), so a refresh costs one glossary pass and one search, never an audio pass.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from shared.cache import FeatureCache, fingerprint_diff
from shared.cli import config_options, figures
from shared.config import Config, diff_configs, save_config
from shared.errors import BadInput
from shared.heads import RetrievalModel, build_model, embed, model_spec, pad_batch
from stage2_train.data import SplitData, global_batches
from stage2_train.losses import RetrievalLoss, build_term_masks, distinct_terms, same_text_mask
from stage2_train.mining import format_stats, mine_hard_negatives
from stage3_index.metrics import recall_at_k


def _dist_setup() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def _gather(x: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: Config, features: str | Path, run: str | Path, log=print):
        self.cfg, self.run, self.log = cfg, Path(run), log
        self.rank, self.world = _dist_setup()
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        dev = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(f"cuda:{self.rank % max(1, torch.cuda.device_count())}" if dev == "cuda" else dev)
        _seed(t.seed)
        self.cache = FeatureCache(features)
        if not self.cache.complete():
            raise BadInput("the feature cache is incomplete", file=features,
                           fix="finish `python -m stage1_extract extract` first (rerun it)")
        self.train_data = SplitData(self.cache, "train", t.in_memory, t.limit)
        self.dev_data = SplitData(self.cache, "dev", t.in_memory, t.limit) if "audio/dev" in self.cache.tables else None
        gl = self.cache.table("text/glossary")
        self.gloss_feats = _all_items(gl)
        self.text_feats = _all_items(self.cache.table("text/chunks"))
        dims = {k: int(v) for k, v in self.cache.index["dims"].items()}
        self.model = build_model(self.cache.root, dims, t.proj_dim, t.pooling, t.temperature,
                                 t.learn_temperature).to(self.device)
        self.spec = model_spec(str(self.cache.root), dims, t.proj_dim, t.pooling)
        top, heads = [], []
        for name, p in self.model.named_parameters():
            (top if ".top." in name else heads).append(p)
        groups = [{"params": heads, "lr": t.lr}]
        if top:
            groups.append({"params": top, "lr": t.top_lr})
        self.opt = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
        self.base_lrs = [g["lr"] for g in groups]
        L = cfg.loss
        self.loss = RetrievalLoss(L.w_text, L.w_term, L.w_reject, L.w_hard, L.reject_margin)
        self.batch_global = t.batch_size * self.world
        self.steps_per_epoch = len(global_batches(self.train_data.terms, len(self.train_data),
                                                  self.batch_global, t.seed, 0, t.dedup_terms))
        self.total_steps = t.epochs * self.steps_per_epoch
        n = len(self.train_data)
        self.memory = np.zeros((n, t.proj_dim), dtype=np.float32)   # latest audio embedding per chunk
        self.seen = np.zeros(n, dtype=bool)
        self.hard = np.full((n, t.hard_k), -1, dtype=np.int64)
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best_r5": -1.0, "bad_evals": 0, "done": False}
        self.mining_seconds = 0.0
        self.autocast = self.device.type == "cuda"

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path, full: bool) -> None:
        if self.rank != 0:
            return
        ckpt = {"model": self.model.state_dict(), "spec": self.spec, "state": dict(self.state),
                "cache_fingerprint": self.cache.fingerprint, "config": self.cfg.to_dict()}
        if full:
            ckpt.update(opt=self.opt.state_dict(), memory=self.memory, seen=self.seen, hard=self.hard,
                        rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()})
        tmp = path.with_name(path.name + ".tmp")
        torch.save(ckpt, tmp)
        tmp.replace(path)  # a killed save never leaves a checkpoint that looks finished

    def load(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        diff = fingerprint_diff(self.cache.fingerprint, ckpt["cache_fingerprint"])  # cache has X, the run Y
        if diff:
            raise BadInput("this run was started on a different feature cache: " + "; ".join(diff), file=path,
                           fix="resume with the cache it started on, or start a new run")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        self.memory, self.seen, self.hard = ckpt["memory"], ckpt["seen"], ckpt["hard"]
        self.state = ckpt["state"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])

    # ------------------------------------------------------------------ pieces
    def text_embed(self, feats: list[np.ndarray]) -> torch.Tensor:
        x, m = pad_batch(feats, self.device)
        return self.model.text(x, m)

    def refresh_hard_negatives(self) -> dict:
        t0 = time.time()
        gloss = embed(self.model.text, self.gloss_feats, device=self.device)
        idx = np.flatnonzero(self.seen)
        if len(idx) == 0:
            return {}
        positives = [set(self.train_data.terms[i]) for i in idx]
        ids, stats = mine_hard_negatives(self.memory[idx], gloss, positives, k=self.cfg.train.hard_k)
        self.hard[idx] = ids
        self.mining_seconds += time.time() - t0
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Dev Recall@1/5/10 of term chunks against the whole cached glossary."""
        d = self.dev_data
        if d is None:
            return {}
        self.model.eval()
        term_items = [i for i in range(len(d)) if d.terms[i]]
        audio = embed(self.model.audio, d.audio.items(term_items), device=self.device)
        gloss = embed(self.model.text, self.gloss_feats, device=self.device)
        ranked = np.argsort(-(audio @ gloss.T), axis=1)[:, :10]
        self.model.train()
        rec = recall_at_k(ranked, [set(d.terms[i]) for i in term_items], ks=(1, 5, 10))
        return {f"dev_r{k}": float(v) for k, v in rec.items()}

    def step(self, batch: np.ndarray) -> dict:
        d, B = self.train_data, self.cfg.train.batch_size
        local = batch[self.rank * B:(self.rank + 1) * B]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            x, m = pad_batch(d.audio.items(local), self.device)
            audio = _gather(self.model.audio(x, m) if len(local) else
                            torch.zeros(0, self.cfg.train.proj_dim, device=self.device), self.world)
            chunk_terms = [d.terms[i] for i in batch]
            cols = distinct_terms(chunk_terms)
            pos, ignore = build_term_masks(chunk_terms, cols, device=self.device)
            terms = self.text_embed([self.gloss_feats[t] for t in cols]) if cols else \
                torch.zeros(0, audio.shape[1], device=self.device)
            text = self.text_embed([self.text_feats[d.text_index[i]] for i in batch])
            same = same_text_mask([int(d.text_index[i]) for i in batch], device=self.device)
            hard_ids = self.hard[batch]
            hard = hard_mask = None
            if (hard_ids >= 0).any():
                flat = [self.gloss_feats[max(int(t), 0)] for t in hard_ids.reshape(-1)]
                hard = self.text_embed(flat).view(len(batch), hard_ids.shape[1], -1)
                hard_mask = torch.from_numpy(hard_ids >= 0).to(self.device)
            total, parts = self.loss(audio.float(), text.float(), terms.float(), pos, ignore,
                                     self.model.logit_scale(), text_same=same,
                                     hard=None if hard is None else hard.float(), hard_mask=hard_mask)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.world > 1:
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        f = lr_factor(self.state["step"], self.cfg.train.warmup_steps, self.total_steps)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * f
        self.opt.step()
        self.memory[batch] = audio.detach().float().cpu().numpy()
        self.seen[batch] = True
        parts["lr"] = self.base_lrs[0] * f
        parts["temperature"] = float(1 / self.model.logit_scale().detach())
        return parts

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False, stop_after: int | None = None) -> dict:
        t = self.cfg.train
        self.run.mkdir(parents=True, exist_ok=True)
        last, best = self.run / "last.pt", self.run / "best.pt"
        metrics_path = self.run / "metrics.jsonl"
        if resume and last.is_file():
            saved = json.loads((self.run / "config.json").read_text())
            diff = diff_configs(saved, json.loads(json.dumps(self.cfg.to_dict())))
            if diff:
                raise BadInput("the run was started with another config: " + "; ".join(
                    f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()), file=self.run,
                    fix="resume with the same settings, or give the new settings their own --run (make train RUN=name)")
            self.load(last)
            self.log(f"resumed from {last} at step {self.state['step']} (epoch {self.state['epoch']})")
            _truncate_metrics(metrics_path, self.state["step"])
        elif self.rank == 0:
            if last.is_file() and not resume:
                raise BadInput("this run folder already holds a run", file=self.run,
                               fix="pass --resume to continue it, or choose another --run")
            save_config(self.cfg, self.run / "config.json")
            metrics_path.write_text("")
        if self.state["done"]:
            self.log("run already finished")
            return self.state
        t0 = time.time()
        bar = tqdm(total=self.total_steps, initial=self.state["step"], desc="train", unit="step",
                   disable=self.rank != 0, mininterval=1.0)
        steps_this_call = 0
        while self.state["epoch"] < t.epochs and not self.state["done"]:
            batches = global_batches(self.train_data.terms, len(self.train_data), self.batch_global, t.seed,
                                     self.state["epoch"], t.dedup_terms)
            while self.state["batch"] < len(batches):
                step = self.state["step"]
                needs_mining = self.loss.w_hard > 0 or self.loss.w_reject > 0
                if needs_mining and step > 0 and step % t.hard_refresh == 0:
                    stats = self.refresh_hard_negatives()
                    if stats and self.rank == 0:
                        self.log(f"step {step} hard negatives: {format_stats(stats)}")
                parts = self.step(batches[self.state["batch"]])
                self.state["batch"] += 1
                self.state["step"] += 1
                steps_this_call += 1
                bar.update(1)
                bar.set_postfix(loss=f"{parts['total']:.3f}")
                if self.rank == 0:
                    _append(metrics_path, {"type": "step", "step": self.state["step"], "epoch": self.state["epoch"],
                                           **{k: round(v, 6) for k, v in parts.items()}})
                epoch_end = self.state["batch"] == len(batches)
                if epoch_end:
                    self.state["epoch"] += 1
                    self.state["batch"] = 0
                if (epoch_end if not t.eval_every else self.state["step"] % t.eval_every == 0) or \
                        (epoch_end and self.state["epoch"] == t.epochs):
                    self._evaluate_and_save(metrics_path, best, last)
                if stop_after is not None and steps_this_call >= stop_after:
                    bar.close()
                    return self.state
                if self.state["done"] or epoch_end:
                    break
        self.state["done"] = True
        self.save(last, full=True)
        bar.close()
        wall = time.time() - t0
        if self.rank == 0:
            self.log(figures(steps=self.state["step"], epochs=self.state["epoch"], wall_s=wall,
                             steps_per_s=steps_this_call / max(wall, 1e-9),
                             mining_share=self.mining_seconds / max(wall, 1e-9),
                             best_dev_r5=self.state["best_r5"]))
        return self.state

    def _evaluate_and_save(self, metrics_path: Path, best: Path, last: Path) -> None:
        ev = self.evaluate()
        if ev:
            if self.rank == 0:
                _append(metrics_path, {"type": "eval", "step": self.state["step"], "epoch": self.state["epoch"], **ev})
                self.log(f"step {self.state['step']} epoch {self.state['epoch']}: dev R@1 {ev['dev_r1']:.3f} "
                         f"R@5 {ev['dev_r5']:.3f} R@10 {ev['dev_r10']:.3f}")
            if ev["dev_r5"] > self.state["best_r5"]:
                self.state["best_r5"] = ev["dev_r5"]
                self.state["bad_evals"] = 0
                self.save(best, full=False)
            else:
                self.state["bad_evals"] += 1
                if self.state["bad_evals"] >= self.cfg.train.patience:
                    self.log(f"early stop: dev R@5 did not improve for {self.state['bad_evals']} evaluations")
                    self.state["done"] = True
        elif self.rank == 0:
            self.save(best, full=False)
        self.save(last, full=True)


def _all_items(table) -> list[np.ndarray]:
    frames, offsets = table.load()
    return [frames[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _append(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint's step, so a resumed run's log has no duplicates."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(cfg: Config, features: str | Path | None = None, run: str | Path = "cache/runs/demo",
          resume: bool = False, log=print, stop_after: int | None = None) -> Trainer:
    features = Path(features) if features else Path(cfg.cache.root) / "features" / cfg.cache.name
    trainer = Trainer(cfg, features, run, log)
    trainer.fit(resume=resume, stop_after=stop_after)
    return trainer


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@config_options
@click.option("--features", type=click.Path(file_okay=False),
              help="Feature cache folder. [cache.root/features/cache.name]")
@click.option("--run", default="cache/runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder: config.json, metrics.jsonl, best.pt, last.pt.")
@click.option("--resume", is_flag=True, help="Continue the run in --run from its last checkpoint.")
def train_command(cfg: Config, features, run, resume):
    """Train heads and the exported top layers on cached features (torchrun for several processes).

    Loss weights: loss.w_text, loss.w_term, loss.w_reject, loss.w_hard (e.g. --set loss.w_term=0.9).
    """
    train(cfg, features, run, resume, log=click.echo)
