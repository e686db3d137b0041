"""Training the second stage (shared/second_stage.py) on the feature cache, after the first stage.

For every train chunk the candidates are the rows the first stage ranks highest (`second.train_top_n`, among
the rows it may mine, `train.mine_from`), the rows actually spoken (positives, added when the first stage
missed them) and, with `second.sound_k`, the rows whose pronunciation is nearest to a positive's by edit
distance: forms that sound alike whether or not the first stage confuses them. Other rows of a chunk's
terms (aliases not spoken) are neither positive nor negative. The loss is the first stage's multi-positive
InfoNCE over a chunk's candidates (each positive against the negatives). The first stage stays as it is.

The first stage ranks its own train chunks almost perfectly (its loss is ~0 long before the end), so its
cosine on them says "this one" far more surely than on new audio: trained beside it, the matching learns
little and the mix trusts the cosine too much. With `second.mix_on = "dev"` (the demo's choice) the
matching is trained alone, and the few numbers of the mix (cosine, matching scores, bias) are fitted
afterwards on dev's candidate lists, where the cosine is as honest as on new audio (dev R@1 .892 vs .848
on the demo, README).

`python -m stage2_train.second --run RUN` adds a second stage to a finished run (RUN/second.pt), or
writes one elsewhere with `--out` (experiments beside a run that is not theirs).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from shared import second_stage as ss
from shared.cache import FeatureCache
from shared.cli import figures, run_cli
from shared.config import Config, config_from_dict, load_config
from shared.errors import BadInput
from shared.heads import checkpoint_path, embed, load_model, pad_batch
from shared.metrics import recall_at_k
from shared.termside import embed_glossary, glossary_forms, rows_to_terms, spoken_rows
from stage2_train.data import SplitData


# ---------------------------------------------------------------- the loss

def candidate_loss(scores: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Multi-positive InfoNCE over each chunk's candidates: every positive against the chunk's negatives,

        l_bp = -log( e^{s_bp} / (e^{s_bp} + sum_{n neg of b} e^{s_bn}) ),  loss = mean over positive pairs

    scores (B, C) logits (the fused scores); pos (B, C) positives; valid (B, C) real candidates (the others
    are padding or ignored). Chunks without a positive add nothing; a batch without any gives a zero in the
    graph."""
    neg = valid & ~pos
    s = scores.masked_fill(~valid, -1e9)
    neg_lse = torch.logsumexp(s.masked_fill(~neg, -1e9), dim=1, keepdim=True)           # (B, 1)
    per = torch.logaddexp(s, neg_lse) - s                                                 # -log p per pair
    mask = pos & valid
    if not mask.any():
        return scores.sum() * 0.0
    return per[mask].mean()


def length_batches(lengths: np.ndarray, batch_size: int, rng, pool: int = 16) -> list[np.ndarray]:
    """An epoch's batches of item indices: shuffled, then sorted by length within pools of `pool` batches, so
    a batch pads its frames little (demo train chunks: 40-92 frames, p10-p99), and the batches shuffled.
    Every item once; at most one short batch per pool."""
    order = rng.permutation(len(lengths))
    out = []
    for g in range(0, len(order), batch_size * pool):
        part = order[g:g + batch_size * pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        out += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [out[j] for j in rng.permutation(len(out))]


# ---------------------------------------------------------------- candidates

def top_rows(audio: np.ndarray, gloss: np.ndarray, rows: np.ndarray, n: int, block: int = 2048
             ) -> tuple[np.ndarray, np.ndarray]:
    """(row ids (C, n), cosines (C, n)) of the n best of `rows` per audio vector, best first (exact)."""
    n = min(n, len(rows))
    sub = gloss[rows]
    ids = np.zeros((len(audio), n), dtype=np.int64)
    sc = np.zeros((len(audio), n), dtype=np.float32)
    for b in range(0, len(audio), block):
        s = audio[b:b + block] @ sub.T
        part = np.argpartition(-s, n - 1, axis=1)[:, :n] if n < s.shape[1] else np.tile(np.arange(n), (len(s), 1))
        ps = np.take_along_axis(s, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        ids[b:b + block] = rows[np.take_along_axis(part, order, 1)]
        sc[b:b + block] = np.take_along_axis(ps, order, 1)
    return ids, sc


def sound_neighbours(texts: list[str], queries: np.ndarray, rows: np.ndarray, k: int) -> dict[int, list[int]]:
    """{query row: its k nearest rows among `rows` by normalised edit distance of `texts` (spaces dropped)},
    itself excluded. rapidfuzz's C++ matrix: 10^3 x 10^3 forms in well under a second."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist
    if k <= 0 or len(queries) == 0:
        return {}
    strip = [t.replace(" ", "") for t in texts]
    d = cdist([strip[q] for q in queries], [strip[r] for r in rows], scorer=Levenshtein.normalized_distance,
              dtype=np.float32, workers=1)
    d[np.asarray(queries)[:, None] == rows[None, :]] = np.inf
    kk = min(k, len(rows))
    near = np.argsort(d, axis=1, kind="stable")[:, :kk]
    return {int(q): [int(rows[j]) for j in near[i] if np.isfinite(d[i, j])] for i, q in enumerate(queries)}


def candidate_lists(first_rows: np.ndarray, positives: list[list[int]], owner: np.ndarray,
                    gold_terms: list[list[int]], extra: dict[int, list[int]] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(rows (C, M) -1 padded, pos (C, M) bool) per chunk: its positive rows first, then the first stage's rows
    and the `extra` rows of each positive, without repeats and without other rows of the chunk's own terms
    (an alias not spoken is neither positive nor negative)."""
    lists = []
    for c, pos in enumerate(positives):
        own = set(int(t) for t in gold_terms[c])
        out = list(dict.fromkeys(int(r) for r in pos))
        seen = set(out)
        more = list(first_rows[c]) + [r for p in pos for r in (extra or {}).get(int(p), [])]
        for r in more:
            r = int(r)
            if r < 0 or r in seen or int(owner[r]) in own:
                continue
            seen.add(r)
            out.append(r)
        lists.append((out, len(set(pos))))
    M = max([len(x) for x, _ in lists], default=1)
    rows = np.full((len(lists), M), -1, dtype=np.int64)
    pos = np.zeros((len(lists), M), dtype=bool)
    for c, (x, n_pos) in enumerate(lists):
        rows[c, :len(x)] = x
        pos[c, :n_pos] = True
    return rows, pos


# ---------------------------------------------------------------- what a phase needs from the run

class Inputs:
    """A trained first stage's view of a split: frames the second stage reads, first-stage vectors."""

    def __init__(self, model, cache: FeatureCache, split: str, limit: int = 0):
        self.data = SplitData(cache, split, "auto", limit)
        n = len(self.data)
        items = self.data.audio.items(range(n))
        self.frames = ss.tower_frames(model.audio, items)
        self.audio = embed(model.audio, items)
        self.terms = self.data.terms[:n]


def glossary_view(model, cache: FeatureCache, distractors: bool = False, splits=("train", "dev")) -> dict:
    """The glossary rows: first-stage vectors, owner, forms and rows of each term. With `distractors`, the
    cache's distractor names follow as rows of terms of their own (ids from the glossary's size on; "n_rows"
    says where they start), less those that clash with a glossary form or are said in the transcripts of
    `splits` (shared/distractors.clashes, as eval drops them): names no chunk says, whatever it says."""
    from shared.distractors import clashes
    from shared.termside import embed_text_table
    vecs, owner = embed_glossary(model, cache)
    owner = np.asarray(owner, dtype=np.int64)
    all_forms = json.loads((cache.root / "forms.json").read_text(encoding="utf-8"))
    forms = dict(all_forms["glossary"])
    rows_of: dict[int, list[int]] = {}
    for r, o in enumerate(owner):
        rows_of.setdefault(int(o), []).append(r)
    texts = glossary_forms(cache.read_json("glossary.json"))[0]
    out = {"vecs": vecs, "owner": owner, "forms": forms, "rows_of": rows_of, "texts": texts, "n_rows": len(owner)}
    if distractors and "text/distractors" in cache.tables and "distractors" in all_forms:
        names = cache.read_json("distractors.json")
        said = []
        for split in splits:
            if f"audio/{split}" in cache.tables:
                said += SplitData(cache, split, "no").used_texts()
        in_gloss, spoken = clashes(names, texts, said)
        ok = np.flatnonzero(~(in_gloss | spoken))
        n_terms = len(cache.read_json("glossary.json")["keys"])
        out["vecs"] = np.concatenate([vecs, embed_text_table(model, cache, "distractors")[ok]]).astype(np.float32)
        out["owner"] = np.concatenate([owner, n_terms + np.arange(len(ok), dtype=np.int64)])
        d = all_forms["distractors"]
        out["forms"] = {k: (list(forms[k]) + [d[k][i] for i in ok]) if forms.get(k) is not None else None
                        for k in ("spell", "phones")}
    return out


def rank_split(inp: Inputs, g: dict, top_n: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first stage's top_n rows (and cosines) per chunk of a split, among `rows` (all when None)."""
    rows = np.arange(len(g["owner"])) if rows is None else rows
    return top_rows(inp.audio, g["vecs"], rows, top_n)


@torch.no_grad()
def score_lists(module: ss.SecondStage, frames: list[np.ndarray], rows: np.ndarray, first: np.ndarray,
                tables: dict, batch: int = 128, features: bool = False) -> np.ndarray:
    """Fused scores (C, M) of candidate rows (or, with `features`, the matching features (C, M, F))."""
    module.eval()
    out = []
    for b in range(0, len(rows), batch):
        x, m = pad_batch(frames[b:b + batch])
        r = torch.from_numpy(rows[b:b + batch])
        f1 = torch.from_numpy(first[b:b + batch].astype(np.float32))
        if features:
            out.append(module.candidate_features(x, m, r, tables).numpy())
        else:
            out.append(module(x, m, r, tables, f1).numpy())
    return np.concatenate(out) if out else np.zeros(rows.shape, np.float32)


def recall_after(rows: np.ndarray, scores: np.ndarray, owner: np.ndarray, gold, ks=(1, 5, 10)) -> dict:
    ranked_rows, ranked_scores = ss.rerank(rows, scores)
    ids, _ = rows_to_terms(ranked_rows, ranked_scores, owner, max(ks))
    return recall_at_k(ids, gold, ks)


def null_candidate_loss(scores: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, w_reject: float
                        ) -> torch.Tensor:
    """`candidate_loss` with a "none of them" candidate of score 0 in every chunk: each positive against the
    negatives and none; a no-term chunk (no positive) wants none above all its candidates,

        l_bp = -log( e^{s_bp} / (e^{s_bp} + sum_neg e^{s_bn} + 1) ),   l_b = log(1 + sum_c e^{s_bc})

    mean l_bp + w_reject * mean l_b. Scores become absolute: above 0 says "this form was said", which is
    what an accept threshold reads."""
    zero = torch.zeros(len(scores), 1, dtype=scores.dtype)
    s = scores.masked_fill(~valid, -1e9)
    has = (pos & valid).any(1)
    neg_lse = torch.logsumexp(torch.cat([s.masked_fill(~(valid & ~pos), -1e9), zero], 1), dim=1, keepdim=True)
    per = torch.logaddexp(s, neg_lse) - s
    mask = pos & valid
    term = per[mask].mean() if mask.any() else scores.sum() * 0.0
    if w_reject <= 0 or has.all():
        return term
    none = torch.logsumexp(torch.cat([s, zero], 1), dim=1)[~has]
    return term + w_reject * none.mean()


def fit_mix(feats: np.ndarray, first: np.ndarray, rows: np.ndarray, pos: np.ndarray, init: np.ndarray,
            bias: float = 0.0, w_reject: float = 0.0, steps: int = 300) -> tuple[np.ndarray, float]:
    """The mix (weights of [cosine, features...]) and bias minimising the candidate loss on given lists
    (features fixed; with `w_reject`, `null_candidate_loss` and the lists' no-term chunks): a few parameters,
    fitted in a second."""
    x = torch.from_numpy(np.concatenate([first[..., None], feats], -1).astype(np.float32))
    valid = torch.from_numpy(rows >= 0)
    p = torch.from_numpy(pos)
    w = torch.tensor(init, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(float(bias), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = null_candidate_loss(x @ w + b, p, valid, w_reject) if w_reject > 0 else candidate_loss(x @ w, p, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy(), float(b.detach())


# ---------------------------------------------------------------- the phase

def train_second_stage(model, cache: FeatureCache, cfg: Config, out: str | Path, log=print,
                       train_limit: int | None = None, provenance: dict | None = None) -> dict:
    """Train a second stage on top of the trained first stage `model` over `cache`; write it to `out`
    (only trained weights + spec + its settings). Returns figures (dev R@1 before / after, seconds)."""
    s, t = cfg.second, cfg.train
    t0 = time.time()
    quiet = log is None
    log = log or (lambda *_: None)
    torch.manual_seed(t.seed)
    rng = np.random.default_rng(t.seed)
    kinds = ss.kinds_of(s.tokens)
    g = glossary_view(model, cache, distractors=s.distractors > 0)
    owner, R0 = g["owner"], g["n_rows"]          # rows >= R0: distractor names
    for kind in kinds:
        if g["forms"].get(ss._FORM_FIELD[kind]) is None:
            raise BadInput(f"second.tokens reads {kind} but the cache has no pronunciations", file=cache.root,
                           fix="extract with text.g2p = espeak, or set second.tokens = chars")
    limit = t.limit if train_limit is None else train_limit
    tr = Inputs(model, cache, "train", limit)
    d = tr.data
    chunk_texts = cache.read_json("chunk_texts.json")
    positives = [spoken_rows(chunk_texts[d.text_index[i]], tr.terms[i], g["texts"], owner, g["rows_of"])
                 for i in range(len(tr.terms))]
    keep = np.array([bool(p) for p in positives])        # term chunks (pseudo-term chunks have no row)
    # the vocabulary: every character of the glossary's forms and of the train transcripts
    chunk_forms = json.loads((cache.root / "forms.json").read_text(encoding="utf-8"))["chunks"]
    train_texts = sorted(set(int(i) for i in d.text_index[:len(tr.terms)]))
    vocab = ss.build_vocab({k: list(g["forms"][ss._FORM_FIELD[k]]) +
                            [chunk_forms[ss._FORM_FIELD[k]][i] for i in train_texts] for k in kinds})
    spec = ss.spec_of(int(tr.frames[0].shape[1]) if tr.frames else int(cache.index["dims"]["audio"]), vocab,
                      s.dim, s.match, s.max_tokens, s.top_n)
    module = ss.build(spec)
    tables = {k: torch.from_numpy(ss.encode_texts(g["forms"][ss._FORM_FIELD[k]], vocab[k], s.max_tokens))
              for k in kinds}
    # candidates: among the rows the first stage may mine (train.mine_from), as it was trained
    searchable = np.arange(R0)
    if t.mine_from == "train":
        searchable = np.flatnonzero(np.isin(owner[:R0], sorted({x for ts in tr.terms for x in ts})))
    idx = np.flatnonzero(keep)
    first_rows, _ = top_rows(tr.audio[idx], g["vecs"], searchable, s.train_top_n)
    if len(owner) > R0:
        # names never said, as a large glossary has thousands: short ones match pieces of any window, and a
        # second stage that never met them scores them high (FAR at 10,000 terms: README)
        first_rows = np.concatenate([first_rows, top_rows(tr.audio[idx], g["vecs"], np.arange(R0, len(owner)),
                                                          s.distractors)[0]], 1)
    extra = None
    if s.sound_k > 0:
        sound_texts = g["forms"]["phones"] if g["forms"].get("phones") is not None else g["forms"]["spell"]
        pos_rows = np.array(sorted({r for i in idx for r in positives[i]}), dtype=np.int64)
        extra = sound_neighbours(sound_texts, pos_rows, searchable, s.sound_k)
    rows, pos = candidate_lists(first_rows, [positives[i] for i in idx], owner, [tr.terms[i] for i in idx], extra)
    first = np.where(rows >= 0, np.einsum("cd,cmd->cm", tr.audio[idx], g["vecs"][np.maximum(rows, 0)]), 0.0
                     ).astype(np.float32)
    frames = [tr.frames[i] for i in idx]
    log(f"second stage: {len(idx)} train chunks x {rows.shape[1]} candidates (first stage top {s.train_top_n}"
        + (f" + {s.sound_k} by sound" if s.sound_k else "")
        + (f" + {min(s.distractors, len(owner) - R0)} distractor names" if len(owner) > R0 else "") + f"), tokens {'+'.join(kinds)}, match {s.match}")

    dev = Inputs(model, cache, "dev") if "audio/dev" in cache.tables else None
    if dev is not None:
        dev_rows, dev_first = rank_split(dev, g, s.top_n, np.arange(R0))
        base = recall_after(dev_rows, dev_first, owner, dev.terms)

    if s.mix_on not in ("train", "dev"):
        raise BadInput(f"second.mix_on {s.mix_on!r}: choose train or dev", file="config [second]",
                       fix="set second.mix_on")
    # mix_on "dev": the matching learns on its own (the cosine left out: on train chunks the first stage has
    # memorised, it would explain the positives before the matching has to), and the mix is fitted on dev
    cos_in_training = s.mix_on == "train"
    opt = torch.optim.AdamW(module.parameters(), lr=s.lr, weight_decay=0.01)
    t_loop = time.time()
    B = s.batch_size
    lengths = np.array([len(f) for f in frames])
    steps_per_epoch = len(length_batches(lengths, B, np.random.default_rng(0)))
    total = max(1, s.epochs * steps_per_epoch)
    step = 0
    bar = tqdm(total=total, desc="second stage", unit="step", mininterval=1.0, disable=quiet)
    for epoch in range(s.epochs):
        module.train()
        epoch_loss = []
        for sel in length_batches(lengths, B, rng):
            x, m = pad_batch([frames[i] for i in sel])
            r = torch.from_numpy(rows[sel])
            scores = module(x, m, r, tables, torch.from_numpy(first[sel]) if cos_in_training else
                            torch.zeros(len(sel), rows.shape[1]))
            loss = candidate_loss(scores, torch.from_numpy(pos[sel]), r >= 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            for grp in opt.param_groups:
                grp["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            epoch_loss.append(loss.item())
        log(f"second stage epoch {epoch + 1}: mean loss {np.mean(epoch_loss):.3f}")
    bar.close()
    loop_seconds = time.time() - t_loop
    module.eval()
    result = {"train_chunks": int(len(idx)), "candidates": int(rows.shape[1])}
    if dev is not None:
        if s.mix_on == "dev":
            # the mix refitted where the first stage's cosine is as honest as on new audio (dev: the
            # threshold and early stopping are picked there too); the encoders stay as trained
            dev_gold = [spoken_rows(chunk_texts[dev.data.text_index[i]], dev.terms[i], g["texts"], owner,
                                    g["rows_of"]) for i in range(len(dev.terms))]
            # term chunks; and no-term chunks when the mix also learns to say "none" (second.reject)
            dkeep = np.flatnonzero([bool(p) or (s.reject > 0 and dev.data.noterm[i])
                                    for i, p in enumerate(dev_gold)])
            # the lists of the glossary padded with the distractor names: the mix must hold at every size
            fit_rows = rank_split(dev, g, s.top_n)[0] if len(owner) > R0 else dev_rows
            drows, dpos = candidate_lists(fit_rows[dkeep], [dev_gold[i] for i in dkeep], owner,
                                          [dev.terms[i] for i in dkeep])
            dfirst = np.where(drows >= 0, np.einsum("cd,cmd->cm", dev.audio[dkeep],
                                                    g["vecs"][np.maximum(drows, 0)]), 0.0).astype(np.float32)
            feats = score_lists(module, [dev.frames[i] for i in dkeep], drows, dfirst, tables, features=True)
            mix, bias = fit_mix(feats, dfirst, drows, dpos, module.mix.detach().numpy(), module.bias.item(),
                                s.reject)
            with torch.no_grad():
                module.mix.copy_(torch.from_numpy(mix))
                module.bias.fill_(bias)
        after = recall_after(dev_rows, score_lists(module, dev.frames, dev_rows, dev_first, tables), owner,
                             dev.terms)
        result.update(dev_r1_first=round(base[1], 4), dev_r1=round(after[1], 4))
    elif s.mix_on == "dev":
        log("second.mix_on = dev but the cache has no dev split: the mix stays as initialised")
    result["train_seconds"] = round(time.time() - t0, 1)
    result["loop_seconds"] = round(loop_seconds, 1)
    ss.save(module, spec, out, {"config": {k: getattr(s, k) for k in s.__dataclass_fields__},
                                "figures": result, **(provenance or {})})
    log(figures(**{"second_" + k: v for k, v in result.items()}))
    return result


def train_for_run(run: str | Path, cfg: Config, out: str | Path | None = None, log=print) -> dict | None:
    """The phase the trainer runs after the first stage (`second.enabled`): the run's best checkpoint,
    its cache; RUN/second.pt (or `out`). Skipped when that file exists (a resumed, finished run)."""
    run = Path(run)
    out = Path(out) if out is not None else run / ss.CHECKPOINT
    if out.is_file():
        return None
    first = checkpoint_path(run)
    model, ckpt = load_model(first)
    cache = FeatureCache(ckpt["spec"]["features"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return train_second_stage(model, cache, cfg, out, log=log, provenance={"first_stage": ss.first_stage_id(first)})


@click.command("second", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "run", required=True, type=click.Path(file_okay=False), help="A trained run folder.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Where the second stage goes. [RUN/second.pt]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config whose keys override the run's saved config (second.* keys matter here).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config key, e.g. --set second.top_n=30 (repeatable).")
@click.option("--force", is_flag=True, help="Train again when the output exists.")
def second_command(run, out, config_path, overrides, force):
    """Train a second stage (late interaction over the first stage's top-N) on a finished run."""
    run = Path(run)
    ckpt = torch.load(checkpoint_path(run), map_location="cpu", weights_only=False)
    cfg = load_config(config_path, list(overrides), base=config_from_dict(ckpt["config"]))
    target = Path(out) if out else run / ss.CHECKPOINT
    if target.is_file() and not force:
        raise BadInput("a second stage is already here", file=target, fix="pass --force to train it again")
    if force and target.is_file():
        target.unlink()
    train_for_run(run, cfg, target, log=click.echo)


if __name__ == "__main__":
    run_cli(second_command)
