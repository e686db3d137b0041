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
import random
import time
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from shared.atomic import atomic_path, write_json_atomic, write_text_atomic
from shared.cache import FeatureCache, fingerprint_diff
from shared.cli import config_options, figures
from shared.config import Config, config_from_dict, diff_configs, save_config
from shared.errors import BadInput
from shared.heads import build_model, embed, model_spec, pad_batch
from shared.metrics import recall_at_k
from shared.termside import embed_table, rows_to_terms, spoken_rows, term_tables
from stage2_train import distributed
from stage2_train.augment import augment_frames
from stage2_train.curves import TensorBoard, plot_run
from stage2_train.data import SplitData, global_batches
from stage2_train.losses import RetrievalLoss, build_term_masks, distinct_terms, same_text_mask
from stage2_train.mining import format_stats, mine_hard_negatives


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Config keys a resumed run may change: they do not change what is trained (evaluation, threads, logging,
# where things are, stage 1's settings, whose effect on the features the cache fingerprint checks).
# Every other difference is refused: the resumed run would not be the run that was started.
FREE_TO_CHANGE = ("eval.", "extract.", "data.", "backbone.", "cache.root", "train.threads", "train.tensorboard",
                  "train.in_memory", "train.device", "second.")    # the second stage trains after the first


def free_to_change(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE_TO_CHANGE)


class Optimizers:
    """AdamW for the heads (lr) and the exported top layers (top_lr); SparseAdam for the text side's n-gram
    bag, whose gradient is sparse: a batch touches a few thousand of its 65,536 rows, and a dense Adam
    update of all of them (16.7M numbers) was half of every step. One object for the loop's calls."""

    def __init__(self, model: torch.nn.Module, lr: float, top_lr: float, weight_decay: float):
        bag = getattr(getattr(model, "text", None), "bag", None)
        self.sparse_params = {id(bag.weight)} if bag is not None and bag.sparse else set()
        top, heads = [], []
        for name, p in model.named_parameters():
            if id(p) not in self.sparse_params:
                (top if ".top." in name else heads).append(p)
        groups = [{"params": heads, "lr": lr}] + ([{"params": top, "lr": top_lr}] if top else [])
        self.parts = [torch.optim.AdamW(groups, weight_decay=weight_decay)]
        if self.sparse_params:
            self.parts.append(torch.optim.SparseAdam([bag.weight], lr=lr))

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.parts]

    def load_state_dict(self, states) -> None:
        states = states if isinstance(states, list) else [states]
        if len(states) != len(self.parts):
            raise BadInput("the checkpoint's optimizer does not match this text side (sparse n-gram bag or not)",
                           fix="resume with the code the run started with, or start a new run")
        for o, st in zip(self.parts, states):
            o.load_state_dict(st)


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """torch's clip_grad_norm_ for dense and sparse gradients alike (its own refuses sparse ones)."""
    params = [p for p in params if p.grad is not None]
    for p in params:                      # coalesced once here; the optimizer then finds it so
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    grads = [p.grad for p in params]
    if not grads:
        return 0.0
    total = torch.sqrt(sum(((g.values() if g.is_sparse else g).float() ** 2).sum() for g in grads))
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return float(total)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: Config, features: str | Path, run: str | Path, log=print):
        self.cfg, self.run, self.log = cfg, Path(run), log
        self.rank, self.world = distributed.setup()
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
        if "audio/train" not in self.cache.tables:
            have = sorted(n.split("/", 1)[1] for n in self.cache.tables if n.startswith("audio/"))
            raise BadInput(f"the feature cache has no train split (it has: {', '.join(have) or 'none'})", file=features,
                           fix="training needs train.jsonl (and dev.jsonl for early stopping): prepare with "
                               "--split-by speaker or ratio (or --split-name train), then extract")
        self.train_data = SplitData(self.cache, "train", t.in_memory, t.limit)
        self.dev_data = SplitData(self.cache, "dev", t.in_memory, t.limit) if "audio/dev" in self.cache.tables else None
        dims = {k: int(v) for k, v in self.cache.index["dims"].items()}
        x = cfg.text
        options = dict(text_encoders=list(x.encoders), pool_heads=t.pool_heads, head=t.head,
                       buckets=x.buckets, bag_dim=x.bag_dim, ngram=[1, x.ngram_max])
        try:
            self.model = build_model(self.cache.root, dims, t.proj_dim, t.pooling, t.temperature,
                                     t.learn_temperature, **options).to(self.device)
        except ValueError as e:
            raise BadInput(str(e), file="config [text]/[train]", fix="fix that setting (--set)") from None
        # absolute: a checkpoint finds its feature cache from any working directory
        self.spec = model_spec(str(self.cache.root.resolve()), dims, t.proj_dim, t.pooling, **options)
        tables = term_tables(self.cache, self.spec, ("glossary", "chunks"))
        self.gloss, self.texts = tables["glossary"], tables["chunks"]
        self.owner = self.gloss.owner                        # glossary row -> term id
        self.equivalent = {int(r): int(o) for r, o in enumerate(self.owner)}
        forms = _glossary_form_texts(self.cache)
        rows_of: dict[int, list[int]] = {}
        for r, o in enumerate(self.owner):
            rows_of.setdefault(int(o), []).append(r)
        chunk_texts = self.cache.read_json("chunk_texts.json")
        d = self.train_data
        # each chunk's positives are the rows of the forms actually spoken (an alias, or the main form)
        self.train_rows = [spoken_rows(chunk_texts[d.text_index[i]], d.terms[i], forms, self.owner, rows_of)
                           for i in range(len(d.terms))]
        # Pseudo-terms (words of the train transcripts, prepare's data.pseudo_ratio) are extra term
        # columns after the glossary rows, each its own group: targets, never glossary terms.
        self.columns = self.gloss
        self.is_pseudo = np.array([bool(p) for p in d.pseudo], dtype=bool)
        if self.is_pseudo.any():
            pseudo = term_tables(self.cache, self.spec, ("pseudo",))["pseudo"]
            self.columns = self.gloss.concat(pseudo)
            R, n_terms = len(self.gloss), int(self.owner.max()) + 1
            row_of = {t: R + j for j, t in enumerate(self.cache.read_json("pseudo.json"))}
            self.equivalent.update({R + j: n_terms + j for j in range(len(pseudo))})
            for i in np.flatnonzero(self.is_pseudo):
                self.train_rows[i] = [row_of[t] for t in d.pseudo[i]]
        self.opt = Optimizers(self.model, t.lr, t.top_lr, t.weight_decay)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        L = cfg.loss
        self.loss = RetrievalLoss(L.w_text, L.w_term, L.w_reject, L.w_hard, L.reject_margin)
        self.batch_global = t.batch_size * self.world
        cap = {}
        self.steps_per_epoch = len(self.batches(0, cap))
        if cap.get("overflow") and self.rank == 0:     # said once: every epoch's batches are dealt alike
            log(f"train.term_cap {t.term_cap} not kept for {cap['overflow']} of {len(self.train_data)} chunks "
                f"({cap['over_cap_terms']} term(s) have more chunks than {self.steps_per_epoch} batches x "
                f"{t.term_cap}): they share a batch with their term; batches stay full and the loss masks "
                f"the repeats")
        self.total_steps = t.epochs * self.steps_per_epoch
        n = len(self.train_data)
        self.memory = np.zeros((n, t.proj_dim), dtype=np.float32)   # latest audio embedding per chunk
        self.seen = np.zeros(n, dtype=bool)
        self.hard = np.full((n, t.hard_k), -1, dtype=np.int64)
        self.cells: dict = {}        # the mining search's centroids, carried from refresh to refresh
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best_r5": -1.0, "bad_evals": 0, "done": False}
        self.mining_seconds = 0.0
        self.autocast = self.device.type == "cuda"

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path, full: bool) -> None:
        if self.rank != 0:
            return
        ckpt = {"model": self.model.state_dict(), "spec": self.spec, "state": dict(self.state),
                "cache_fingerprint": self.cache.fingerprint, "config": self.cfg.to_dict(),
                "layout": self.layout()}
        if full:
            ckpt.update(opt=self.opt.state_dict(), memory=self.memory, seen=self.seen, hard=self.hard,
                        cells=self.cells,
                        rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()})
        with atomic_path(path) as tmp:    # a killed save never leaves a checkpoint that looks finished
            torch.save(ckpt, tmp)

    def load(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        diff = fingerprint_diff(self.cache.fingerprint, ckpt["cache_fingerprint"])  # cache has X, the run Y
        if diff:
            raise BadInput("this run was started on a different feature cache: " + "; ".join(diff), file=path,
                           fix="resume with the cache it started on, or start a new run")
        saved = ckpt.get("layout")
        if saved is not None and saved != self.layout():
            raise BadInput(f"this run was trained as {saved['world']} process(es) x batch {saved['batch_size']} "
                           f"(global batch {saved['global_batch']}); this resume is {self.world} x "
                           f"{self.cfg.train.batch_size}", file=path,
                           fix=f"resume with the same layout (torchrun --nproc-per-node {saved['world']}, "
                               f"train.batch_size={saved['batch_size']}), or start a new run")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        self.memory, self.seen, self.hard = ckpt["memory"], ckpt["seen"], ckpt["hard"]
        self.cells = ckpt.get("cells", {})
        self.state = ckpt["state"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])

    def layout(self) -> dict:
        """How the epoch is cut into steps: a resume must cut it the same way to continue exactly."""
        return {"world": self.world, "batch_size": self.cfg.train.batch_size, "global_batch": self.batch_global}

    # ------------------------------------------------------------------ pieces
    def batches(self, epoch: int, stats: dict | None = None) -> list[np.ndarray]:
        """The epoch's global batches; pseudo-term chunks drop out after `train.pseudo_epochs`."""
        t, n = self.cfg.train, len(self.train_data)
        subset = None
        if t.pseudo_epochs and epoch >= t.pseudo_epochs and self.is_pseudo[:n].any():
            subset = np.flatnonzero(~self.is_pseudo[:n])
        return global_batches(self.train_data.terms, n, self.batch_global, t.seed, epoch, t.term_cap, subset,
                              stats)

    def text_embed(self, table, idx) -> torch.Tensor:
        # numpy's global generator: seeded by _seed and saved in checkpoints, so resume stays exact
        return self.model.text(**table.batch(idx, self.device, self.cfg.text.gram_dropout,
                                             np.random))

    def refresh_hard_negatives(self) -> dict:
        t0 = time.time()
        # big blocks: the glossary is the largest thing the text side embeds (measured by hand: 0.42 s at 4,096
        # rows a block against 0.45-1.1 s at 1,024 for 100,000 rows on 2 cores)
        gloss = embed_table(self.model.text, self.gloss, batch_size=4096, device=self.device)
        idx = np.flatnonzero(self.seen)
        if len(idx) == 0:
            return {}
        R = len(self.gloss)     # pseudo-term rows (>= R) are not searched: any glossary row is their negative
        rows = np.arange(R)
        if self.cfg.train.mine_from == "train":
            trained = self.train_data.used_terms()      # the first train.limit chunks, as eval's "seen"
            rows = np.flatnonzero(np.isin(self.owner, sorted(trained)))
        elif self.cfg.train.mine_from != "all":
            raise BadInput(f"train.mine_from {self.cfg.train.mine_from!r}", file="config [train]",
                           fix="use all or train")
        local = np.full(R, -1, dtype=np.int64)          # glossary row -> its place among the searched rows
        local[rows] = np.arange(len(rows))
        positives = [{int(local[r]) for r in self.train_rows[i] if r < R and local[r] >= 0} for i in idx]
        t = self.cfg.train
        # all rows: the embeddings as they are (a copy of a 100,000-row glossary is 200 MB of fresh pages)
        ids, stats = mine_hard_negatives(self.memory[idx], gloss if len(rows) == R else gloss[rows], positives,
                                         equivalent=self.owner[rows],
                                         k=t.hard_k, exclude_top=t.hard_exclude_top,
                                         max_score=t.hard_max_score if t.hard_max_score < 1.0 else None,
                                         absolute_margin=t.hard_margin if t.hard_margin >= 0 else None,
                                         index_factory=t.mine_index, cells=self.cells)
        self.hard[idx] = np.where(ids >= 0, rows[np.maximum(ids, 0)], -1)
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
        gloss = embed_table(self.model.text, self.gloss, device=self.device)
        sims = audio @ gloss.T
        depth = min(40, sims.shape[1])
        rows = np.argsort(-sims, axis=1)[:, :depth]
        ranked, _ = rows_to_terms(rows, np.take_along_axis(sims, rows, 1), self.owner, 10)
        self.model.train()
        rec = recall_at_k(ranked, [set(d.terms[i]) for i in term_items], ks=(1, 5, 10))
        return {f"dev_r{k}": float(v) for k, v in rec.items()}

    def step(self, batch: np.ndarray) -> dict:
        d, B = self.train_data, self.cfg.train.batch_size
        local = batch[self.rank * B:(self.rank + 1) * B]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            t = self.cfg.train
            if len(local):
                items = d.audio.items(local)
                if t.augment_speed or t.augment_mask or t.augment_noise:
                    # its own generator per (step, rank): nothing else's random stream moves, so ranks stay in
                    # step with each other and a resumed run draws the same augmentation
                    rng = np.random.default_rng([t.seed, self.state["step"], self.rank])
                    items = augment_frames(items, rng, t.augment_speed, t.augment_mask, t.augment_noise)
                own = self.model.audio(*pad_batch(items, self.device))
            else:     # the epoch's last batch left this rank nothing: it still joins the collectives
                own = torch.zeros(0, t.proj_dim, device=self.device)
            audio = distributed.gather_rows(own, distributed.slice_sizes(len(batch), B, self.world), B)
            chunk_terms = [self.train_rows[i] for i in batch]
            cols = distinct_terms(chunk_terms)
            pos, ignore = build_term_masks(chunk_terms, cols, self.equivalent, device=self.device)
            terms = self.text_embed(self.columns, cols) if cols else \
                torch.zeros(0, audio.shape[1], device=self.device)
            text = self.text_embed(self.texts, d.text_index[batch])
            same = same_text_mask([int(d.text_index[i]) for i in batch], device=self.device)
            hard_ids = self.hard[batch]
            hard = hard_mask = None
            if (hard_ids >= 0).any():
                # a row is mined for many chunks of a batch: each distinct row goes through the text side once
                rows, where = np.unique(np.maximum(hard_ids.reshape(-1), 0), return_inverse=True)
                hard = self.text_embed(self.gloss, rows)[torch.from_numpy(where.reshape(-1)).to(self.device)]
                hard = hard.view(len(batch), hard_ids.shape[1], -1)
                hard_mask = torch.from_numpy(hard_ids >= 0).to(self.device)
            total, parts = self.loss(audio.float(), text.float(), terms.float(), pos, ignore,
                                     self.model.logit_scale(), text_same=same,
                                     hard=None if hard is None else hard.float(), hard_mask=hard_mask)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        distributed.average_gradients(self.model.parameters(), self.world, sparse=self.opt.sparse_params)
        clip_grad_norm(self.model.parameters(), self.cfg.train.grad_clip)
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
        """Train epoch by epoch from where the run stands (a new run, or its last checkpoint with
        `resume`): refresh hard negatives every `hard_refresh` steps, evaluate on dev at each epoch's end
        (or every `eval_every` steps), keep best.pt and last.pt, stop early after `patience` evaluations
        without gain. `stop_after` steps (tests: a killed run) returns mid-way."""
        t = self.cfg.train
        self.run.mkdir(parents=True, exist_ok=True)
        self._start(resume)
        if self.state["done"]:
            self.log("run already finished")
            if self.rank == 0:
                self._mark_finished()
            return self.state
        self.tensorboard = TensorBoard(self.run, t.tensorboard and self.rank == 0, self.log)
        t0 = time.time()
        bar = tqdm(total=self.total_steps, initial=self.state["step"], desc="train", unit="step",
                   disable=self.rank != 0, mininterval=1.0)
        steps_this_call = 0
        while self.state["epoch"] < t.epochs and not self.state["done"]:
            batches = self.batches(self.state["epoch"])
            while self.state["batch"] < len(batches):
                if self._mining_due():
                    stats = self.refresh_hard_negatives()
                    if stats and self.rank == 0:
                        self.log(f"step {self.state['step']} hard negatives: {format_stats(stats)}")
                parts = self.step(batches[self.state["batch"]])
                self.state["batch"] += 1
                self.state["step"] += 1
                steps_this_call += 1
                bar.update(1)
                bar.set_postfix(loss=f"{parts['total']:.3f}")
                self._log_step(parts)
                epoch_end = self.state["batch"] == len(batches)
                if epoch_end:
                    self.state["epoch"] += 1
                    self.state["batch"] = 0
                if self._eval_due(epoch_end):
                    self._evaluate_and_save()
                if stop_after is not None and steps_this_call >= stop_after:
                    bar.close()
                    self.tensorboard.close()
                    return self.state
                if self.state["done"] or epoch_end:
                    break
        self.state["done"] = True
        self.save(self.run / "last.pt", full=True)
        bar.close()
        self.tensorboard.close()
        if self.rank == 0:
            plot_run(self.run)
        wall = time.time() - t0
        if self.rank == 0:
            self._mark_finished()
            self.log(figures(steps=self.state["step"], epochs=self.state["epoch"], wall_s=wall,
                             steps_per_s=steps_this_call / max(wall, 1e-9),
                             mining_share=self.mining_seconds / max(wall, 1e-9),
                             best_dev_r5=self.state["best_r5"]))
        return self.state


    def _start(self, resume: bool) -> None:
        """Continue the run's last checkpoint (same config but for FREE_TO_CHANGE keys), or start a new run."""
        last, metrics_path = self.run / "last.pt", self.run / "metrics.jsonl"
        if resume and last.is_file():
            # a key added to the code after the run started counts as its default, not as a change
            saved = config_from_dict(json.loads((self.run / "config.json").read_text())).to_dict()
            diff = {k: v for k, v in diff_configs(json.loads(json.dumps(saved)),
                                                  json.loads(json.dumps(self.cfg.to_dict()))).items()
                    if not free_to_change(k)}
            if diff:
                raise BadInput("the run was started with another config: " + "; ".join(
                    f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()), file=self.run,
                    fix="resume with the same settings, or give the new settings their own --run-dir (make train RUN=name)")
            self.load(last)
            self.log(f"resumed from {last} at step {self.state['step']} (epoch {self.state['epoch']})")
            _truncate_metrics(metrics_path, self.state["step"])
        elif self.rank == 0:
            if last.is_file() and not resume:
                raise BadInput("this run folder already holds a run", file=self.run,
                               fix="pass --resume to continue it, or choose another --run-dir")
            save_config(self.cfg, self.run / "config.json")
            metrics_path.write_text("")

    def _mining_due(self) -> bool:
        """Hard negatives are refreshed every `hard_refresh` steps (not at step 0: no chunk embedded yet)
        when a loss part uses them."""
        step, t = self.state["step"], self.cfg.train
        return (self.loss.w_hard > 0 or self.loss.w_reject > 0) and step > 0 and step % t.hard_refresh == 0

    def _eval_due(self, epoch_end: bool) -> bool:
        """At each epoch's end, or every `eval_every` steps when set; always after the last epoch."""
        t = self.cfg.train
        if epoch_end and self.state["epoch"] == t.epochs:
            return True
        return self.state["step"] % t.eval_every == 0 if t.eval_every else epoch_end

    def _log_step(self, parts: dict) -> None:
        if self.rank == 0:
            _append(self.run / "metrics.jsonl", {"type": "step", "step": self.state["step"],
                                                 "epoch": self.state["epoch"],
                                                 **{k: round(v, 6) for k, v in parts.items()}})
            self.tensorboard.scalars("train", parts, self.state["step"])

    def _mark_finished(self) -> None:
        """RUN/finished.json: the mark `make eval` (and anyone scripting runs) checks; this run is done,
        evaluate it as it is, never train it again. The second stage (`second.enabled`) trains first, on the
        best checkpoint: a run killed during it is not finished, and a resume trains only it."""
        if self.cfg.second.enabled:
            from stage2_train.second import train_for_run
            train_for_run(self.run, self.cfg, log=self.log)      # no-op when RUN/second.pt exists
        write_json_atomic(self.run / "finished.json", {
            "steps": self.state["step"], "epochs": self.state["epoch"], "best_dev_r5": self.state["best_r5"],
            "checkpoint": "best.pt" if (self.run / "best.pt").is_file() else "last.pt"})

    def _evaluate_and_save(self) -> None:
        metrics_path, best = self.run / "metrics.jsonl", self.run / "best.pt"
        ev = self.evaluate()
        if ev:
            if self.rank == 0:
                _append(metrics_path, {"type": "eval", "step": self.state["step"], "epoch": self.state["epoch"], **ev})
                self.tensorboard.scalars("dev", ev, self.state["step"])
                plot_run(self.run)          # curves.png follows the run, evaluation by evaluation
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
        self.save(self.run / "last.pt", full=True)


def _glossary_form_texts(cache) -> list[str]:
    from shared.termside import glossary_forms
    return glossary_forms(cache.read_json("glossary.json"))[0]


def _append(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint's step, so a resumed run's log has no duplicates."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue          # the torn last line of a run killed mid-write
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


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
# --run-dir, not --run: torchrun reads `--run` (and `--run=...`) as an abbreviation of its own --run-path
# even after `-m stage2_train`; --run still works without torchrun
@click.option("--run-dir", "--run", "run", default="cache/runs/demo", show_default=True,
              type=click.Path(file_okay=False), help="Run folder: config.json, metrics.jsonl, best.pt, last.pt.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
def train_command(cfg: Config, features, run, resume):
    """Train heads and the exported top layers on cached features (torchrun for several processes).

    Loss weights: loss.w_text, loss.w_term, loss.w_reject, loss.w_hard (e.g. --set loss.w_term=0.9).
    """
    train(cfg, features, run, resume, log=click.echo)
