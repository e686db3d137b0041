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
    """One learned query attends over the frames (masked softmax)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim))
        self.key = nn.Linear(dim, dim)

    def forward(self, x, mask):
        scores = self.key(x) @ self.query / math.sqrt(x.shape[-1])
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        w = torch.softmax(scores, dim=1) * mask
        return (w.unsqueeze(-1) * x).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-9)


def masked_mean(x, mask):
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class Tower(nn.Module):
    """top layers (possibly identity) -> pooling -> linear projection -> L2 norm."""

    def __init__(self, top: nn.Module, in_dim: int, proj_dim: int, pooling: str = "mean"):
        super().__init__()
        self.top = top
        self.pooling = pooling
        self.pool = AttentivePool(in_dim) if pooling == "attentive" else None
        self.proj = nn.Linear(in_dim, proj_dim)

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


class RetrievalModel(nn.Module):
    def __init__(self, audio: Tower, text: Tower, temperature: float = 0.07, learn_temperature: bool = True):
        super().__init__()
        self.audio, self.text = audio, text
        # stored as log(1/T) so it stays positive; clamped at 100 as in CLIP
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)), requires_grad=learn_temperature)

    def logit_scale(self):
        return self.log_scale.exp().clamp(max=100.0)



def build_model(features_dir: str | Path, in_dims: dict, proj_dim: int = 512, pooling: str = "mean",
                temperature: float = 0.07, learn_temperature: bool = True) -> RetrievalModel:
    """Fresh model whose top layers start from the weights exported beside the features."""
    features_dir = Path(features_dir)
    audio = Tower(load_top(features_dir / "top_audio"), in_dims["audio"], proj_dim, pooling)
    text = Tower(load_top(features_dir / "top_text"), in_dims["text"], proj_dim, pooling)
    return RetrievalModel(audio, text, temperature, learn_temperature)


def model_spec(features_dir, in_dims, proj_dim, pooling) -> dict:
    return {"features": str(features_dir), "in_dims": in_dims, "proj_dim": proj_dim, "pooling": pooling}


def load_model(checkpoint: str | Path | dict, features_dir: str | Path | None = None, device="cpu") -> tuple[RetrievalModel, dict]:
    """Rebuild a trained model from its checkpoint (a path, or the loaded dict) and the exported tops
    beside its features."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu",
                                                                       weights_only=False)
    spec = ckpt["spec"]
    model = build_model(features_dir or spec["features"], spec["in_dims"], spec["proj_dim"], spec["pooling"])
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
    out = np.zeros((len(items), tower.proj.out_features), dtype=np.float32)
    was = tower.training
    tower.eval()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        x, m = pad_batch([items[i] for i in idx], device)
        out[idx] = tower(x, m).float().cpu().numpy()
    tower.train(was)
    return out
