"""The trained retriever: for each side, exported top layers -> pooling -> projection -> L2 norm.

Stage 2 trains it on cached tap features; stage 3 loads it to embed queries and the glossary.
It knows nothing of files beyond its checkpoint, and nothing of ranks.
A checkpoint holds only what was trained (heads, top layers, temperature) plus the spec needed
to rebuild the modules (the exported tops' json beside the features).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shared.top_layers import load_top


class AttentivePool(nn.Module):
    """`heads` learned queries attend over the frames (masked softmax); their outputs are
    concatenated (heads x dim), so several queries can look at different parts of a chunk."""

    def __init__(self, dim: int, heads: int = 1):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(dim) if heads == 1 else torch.randn(heads, dim) * 0.02)
        self.key = nn.Linear(dim, dim)

    def forward(self, x, mask):
        q = self.query if self.heads > 1 else self.query[None]
        # key(x) @ q.T, associated the cheap way: (W^T q) is (D, H), so scoring the frames is one
        # (B*T, D) x (D, H) product instead of keying every frame ((B*T, D) x (D, D)), forward and
        # backward. Same function and parameters; that product was a third of a demo training step.
        v = self.key.weight.T @ q.T                                               # (D, H)
        c = q @ self.key.bias if self.key.bias is not None else 0.0               # (H,)
        scores = (x @ v + c) / math.sqrt(x.shape[-1])                            # (B, T, H)
        scores = scores.masked_fill(~mask[..., None], torch.finfo(scores.dtype).min)
        w = torch.softmax(scores, dim=1) * mask[..., None]
        pooled = torch.einsum("bth,btd->bhd", w, x) / w.sum(1)[..., None].clamp_min(1e-9)
        return pooled.reshape(len(x), -1)


def masked_mean(x, mask):
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def make_head(in_dim: int, proj_dim: int, kind: str = "linear") -> nn.Module:
    """The projection into the shared space: one linear map, or a two-layer MLP."""
    if kind == "linear":
        return nn.Linear(in_dim, proj_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, 2 * proj_dim), nn.GELU(), nn.Linear(2 * proj_dim, proj_dim))
    raise ValueError(f"unknown head {kind!r}; use linear or mlp")


class Tower(nn.Module):
    """top layers (possibly identity) -> pooling -> projection head -> L2 norm."""

    def __init__(self, top: nn.Module, in_dim: int, proj_dim: int, pooling: str = "mean",
                 pool_heads: int = 1, head: str = "linear"):
        super().__init__()
        self.top = top
        self.pooling = pooling
        self.pool = AttentivePool(in_dim, pool_heads) if pooling == "attentive" else None
        self.out_dim = in_dim * (pool_heads if pooling == "attentive" else 1)
        self.proj = make_head(self.out_dim, proj_dim, head)
        self.proj_dim = proj_dim

    def train(self, mode: bool = True):
        # Top layers stay deterministic (no dropout): runs are reproducible and resumable, and a
        # DDP step equals a single-process step on the same global batch.
        super().train(mode)
        self.top.eval()
        return self

    def pooled(self, x, mask):
        x, mask = self.top(x, mask)
        return masked_mean(x, mask) if self.pool is None else self.pool(x, mask)

    def forward(self, x, mask):
        return F.normalize(self.proj(self.pooled(x, mask)), dim=-1)


FORM_PARTS = ("chars", "phones")
TEXT_PARTS = ("lm",) + FORM_PARTS


class TextSide(nn.Module):
    """The term / chunk-text encoder, made of parts chosen in the config (`text.encoders`):

    - `lm`: the frozen LM's cached states through the exported top, pooled (what a term *means*);
    - `chars` / `phones`: hashed character n-grams of the spelling / of the IPA pronunciation, in
      one shared EmbeddingBag (what a term *looks and sounds like*). One bag over both kinds of
      n-gram measured better than two bags (../shared/NOTES.md), and a term never seen in training
      still gets a vector from the n-grams it shares with seen ones: that is what lets it be found.

    The parts' vectors are concatenated and projected by one head, then L2-normalised.
    """

    def __init__(self, encoders, lm: Tower | None, proj_dim: int, buckets: int = 1 << 16,
                 bag_dim: int = 256, head: str = "linear", ngram=(1, 4)):
        super().__init__()
        self.encoders = list(encoders)
        self.buckets, self.ngram = buckets, tuple(ngram)    # how forms become n-gram ids
        unknown = [e for e in self.encoders if e not in TEXT_PARTS]
        if unknown or not self.encoders:
            raise ValueError(f"text.encoders {self.encoders}: choose from {', '.join(TEXT_PARTS)}")
        self.lm = lm if "lm" in self.encoders else None
        self.uses_forms = any(e in FORM_PARTS for e in self.encoders)
        # sparse gradients: a batch touches a few thousand of the `buckets` rows (SparseAdam updates only them)
        self.bag = nn.EmbeddingBag(buckets, bag_dim, mode="mean", sparse=True) if self.uses_forms else None
        if self.bag is not None:
            nn.init.normal_(self.bag.weight, std=0.1)
        in_dim = (lm.out_dim if self.lm is not None else 0) + (bag_dim if self.bag is not None else 0)
        self.head = make_head(in_dim, proj_dim, head)
        self.proj_dim = proj_dim

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lm is not None:
            self.lm.top.eval()
        return self

    def forward(self, lm_x=None, lm_mask=None, gram_ids=None, gram_offsets=None):
        parts = []
        if self.lm is not None:
            parts.append(self.lm.pooled(lm_x, lm_mask))
        if self.bag is not None:
            parts.append(self._bag(gram_ids, gram_offsets))
        return F.normalize(self.head(torch.cat(parts, dim=-1)), dim=-1)

    def _bag(self, gram_ids, gram_offsets):
        """The n-gram bag's mean vectors. With gradients, each distinct id's row is looked up once and
        the bags average those rows: the bag's own sparse gradient has one row per id *occurrence*
        (~40,000 x 256 per demo step, then summed by a sort), this one a row per distinct id
        (a few thousand). Same values, same gradient."""
        if not (torch.is_grad_enabled() and self.bag.weight.requires_grad):
            return self.bag(gram_ids, gram_offsets)
        ids, where = torch.unique(gram_ids, return_inverse=True)
        rows = F.embedding(ids, self.bag.weight, sparse=self.bag.sparse)
        return F.embedding_bag(where, rows, gram_offsets, mode="mean")


class RetrievalModel(nn.Module):
    def __init__(self, audio: Tower, text: TextSide, temperature: float = 0.07, learn_temperature: bool = True):
        super().__init__()
        self.audio, self.text = audio, text
        # stored as log(1/T) so it stays positive; clamped at 100 as in CLIP
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)), requires_grad=learn_temperature)

    def logit_scale(self):
        return self.log_scale.exp().clamp(max=100.0)


def build_model(features_dir: str | Path, in_dims: dict, proj_dim: int = 512, pooling: str = "mean",
                temperature: float = 0.07, learn_temperature: bool = True, *, text_encoders=("lm",),
                pool_heads: int = 1, head: str = "linear", buckets: int = 1 << 16, bag_dim: int = 256,
                ngram=(1, 4), **_ignored) -> RetrievalModel:
    """Fresh model whose top layers start from the weights exported beside the features."""
    features_dir = Path(features_dir)
    audio = Tower(load_top(features_dir / "top_audio"), in_dims["audio"], proj_dim, pooling, pool_heads, head)
    lm = None
    if "lm" in text_encoders:
        # the LM part is pooled here and projected by the text side's one head
        lm = Tower(load_top(features_dir / "top_text"), in_dims["text"], proj_dim, pooling, pool_heads)
        lm.proj = nn.Identity()
    text = TextSide(text_encoders, lm, proj_dim, buckets, bag_dim, head, ngram)
    return RetrievalModel(audio, text, temperature, learn_temperature)


def model_spec(features_dir, in_dims, proj_dim, pooling, **options) -> dict:
    """What `build_model` needs to rebuild a checkpoint's modules (options: text_encoders, pool_heads,
    head, buckets, bag_dim, ngram)."""
    return {"features": str(features_dir), "in_dims": in_dims, "proj_dim": proj_dim, "pooling": pooling,
            **options}


def checkpoint_path(run: str | Path) -> Path:
    """A run folder's best checkpoint (its last one when training never validated)."""
    from shared.errors import BadInput
    run = Path(run)
    if not run.is_dir():
        raise BadInput("run folder does not exist", file=run,
                       fix="give the folder a training run wrote (e.g. cache/runs/demo)")
    for name in ("best.pt", "last.pt"):
        if (run / name).is_file():
            return run / name
    raise BadInput("run folder has no checkpoint (best.pt or last.pt)", file=run,
                   fix="train it first (python -m stage2_train --config ... into this folder, or make train)")


def load_model(checkpoint: str | Path | dict, features_dir: str | Path | None = None, device="cpu") -> tuple[RetrievalModel, dict]:
    """Rebuild a trained model from its checkpoint (a path, or the loaded dict) and the exported tops
    beside its features."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu",
                                                                       weights_only=False)
    spec = dict(ckpt["spec"])
    model = build_model(features_dir or spec.pop("features"), spec.pop("in_dims"), spec.pop("proj_dim"),
                        spec.pop("pooling"), **{k: v for k, v in spec.items() if k != "features"})
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def pad_batch(items: list[np.ndarray], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ragged (T_i, D) items into (B, T, D) float32 and a (B, T) bool mask."""
    T = max(1, max(len(x) for x in items))
    D = items[0].shape[1]
    out = np.zeros((len(items), T, D), dtype=np.float32)
    mask = np.zeros((len(items), T), dtype=bool)
    for i, x in enumerate(items):
        out[i, :len(x)] = x
        mask[i, :len(x)] = True
    return torch.from_numpy(out).to(device), torch.from_numpy(mask).to(device)


@torch.no_grad()
def embed(tower: Tower, items: list[np.ndarray], batch_size: int = 256, device="cpu") -> np.ndarray:
    """Embeddings (N, P) float32 of ragged items, in order; batches sorted by length to pad little."""
    order = np.argsort([len(x) for x in items], kind="stable")
    out = np.zeros((len(items), tower.proj_dim), dtype=np.float32)
    was = tower.training
    tower.eval()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        x, m = pad_batch([items[i] for i in idx], device)
        out[idx] = tower(x, m).float().cpu().numpy()
    tower.train(was)
    return out
