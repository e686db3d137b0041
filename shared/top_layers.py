"""The trainable top of a frozen backbone, rebuilt from a small exported file.

Stage 1 caches the hidden states that *enter* layer L-N of the audio tower / text model (the "tap") and
exports the top N layers plus whatever follows them (tower: avg-pool + layer_norm; Qwen2 LM: final RMSNorm;
BERT: nothing) as `PREFIX.safetensors` + `PREFIX.json`. `load_top(PREFIX)` rebuilds that top from
transformers' own layer classes, so stage 2 can fine-tune it on cached features without ever loading
the big model, and `features at the tap -> load_top(...)` reproduces the full model's final states.

Every top has the same interface: `forward(x (B, T, D), mask (B, T) bool) -> (y (B, T', D), mask')`
where `mask` is True on real frames/tokens (sequences are right-padded). T' = T // 2 for the audio tower
(its avg-pool halves the frame rate, 50 Hz -> 25 Hz), T' = T otherwise. N = 0 gives the identity.

This file owns the on-disk format of the exported top and the two helpers the backbone shares with it
(`attention_bias`, `pool_pairs`), so that the full model and the rebuilt top mask and pool identically.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from shared.atomic import atomic_path, write_json_atomic

FORMAT = "top_layers/1"


def attention_bias(mask: torch.Tensor, dtype: torch.dtype, causal: bool = False) -> torch.Tensor:
    """(B, T) bool keep-mask -> additive bias for transformers' eager and sdpa attention:
    (B, 1, 1, T) (broadcast over queries: 30 s chunks would need B x 1500^2 otherwise) or (B, 1, T, T) if causal.

    A finite minimum (not -inf) keeps rows without any valid key (padding rows) finite instead of NaN.
    """
    keep = mask[:, None, None, :]
    if causal:
        T = mask.shape[1]
        keep = keep & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    bias = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)


def pool_pairs(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-Audio tower's AvgPool1d(2, 2) over time on a right-padded batch.

    A pooled frame is real only if both of its input frames are: a sequence of n frames gives n // 2,
    exactly what the tower gives the same sequence alone (an odd last frame is dropped).
    """
    T = x.shape[1] // 2
    y = 0.5 * (x[:, 0:2 * T:2] + x[:, 1:2 * T:2])
    return y, mask[:, 0:2 * T:2] & mask[:, 1:2 * T:2]


class IdentityTop(nn.Module):
    """N = 0: stage 2 trains only its heads on the final hidden states."""
    n_layers = 0

    def forward(self, x, mask):
        return x, mask


class AudioTowerTop(nn.Module):
    """Top N `Qwen2AudioEncoderLayer`s of a Qwen2-Audio (or converted Whisper) tower, then avg-pool + layer_norm."""

    def __init__(self, config, n_layers: int):
        super().__init__()
        from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoderLayer
        self.n_layers = n_layers
        self.layers = nn.ModuleList([Qwen2AudioEncoderLayer(config) for _ in range(n_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x, mask):
        bias = attention_bias(mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        x, mask = pool_pairs(x, mask)
        return self.layer_norm(x), mask


class Qwen2Top(nn.Module):
    """Top N `Qwen2DecoderLayer`s of a Qwen2 language model, then its final RMSNorm.

    Positions are 0..T-1 in every row (right padding), as in the full model's forward over the same
    tokens; attention is causal and ignores padding.
    """

    def __init__(self, config, n_layers: int):
        super().__init__()
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
        first = config.num_hidden_layers - n_layers
        types = getattr(config, "layer_types", None) or []
        if "sliding_attention" in types[first:]:
            raise NotImplementedError("sliding-window attention layers in the exported top are not supported")
        self.n_layers = n_layers
        # layer_idx keeps the original index: it selects the layer's type (full/sliding) from the config
        self.layers = nn.ModuleList([Qwen2DecoderLayer(config, first + i) for i in range(n_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)

    def forward(self, x, mask):
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)[None].expand(B, T)
        cos_sin = self.rotary_emb(x, pos)
        bias = attention_bias(mask, x.dtype, causal=True)
        for layer in self.layers:
            x = layer(x, attention_mask=bias, position_embeddings=cos_sin, position_ids=pos)
        return self.norm(x), mask


class BertTop(nn.Module):
    """Top N `BertLayer`s (their output is already BERT's last_hidden_state: no final norm follows)."""

    def __init__(self, config, n_layers: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer
        first = config.num_hidden_layers - n_layers
        self.n_layers = n_layers
        self.layer = nn.ModuleList([BertLayer(config, layer_idx=first + i) for i in range(n_layers)])

    def forward(self, x, mask):
        bias = attention_bias(mask, x.dtype)
        for layer in self.layer:
            x = layer(x, bias)
        return x, mask


def _config(kind: str, d: dict):
    from transformers import BertConfig, Qwen2AudioEncoderConfig, Qwen2Config
    cls = {"qwen2audio_encoder": Qwen2AudioEncoderConfig, "qwen2": Qwen2Config, "bert": BertConfig}[kind]
    config = cls.from_dict(d)
    config._attn_implementation = "sdpa"  # works with our additive float bias; flash kernels would not
    return config


_TOPS = {"identity": IdentityTop, "qwen2audio_encoder": AudioTowerTop, "qwen2": Qwen2Top, "bert": BertTop}


def save_top(path_prefix: str | Path, kind: str, n_layers: int, config: dict | None,
             state_dict: dict[str, torch.Tensor], **info) -> None:
    """Write `PREFIX.safetensors` (weights, keyed as in the rebuilt module) and `PREFIX.json` (how to
    rebuild: kind, layer count, the transformers config). `info` adds descriptive fields (dims, rates)."""
    from safetensors.torch import save_file
    prefix = Path(str(path_prefix).removesuffix(".json").removesuffix(".safetensors"))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if kind not in _TOPS:
        raise ValueError(f"unknown top kind {kind!r}; known: {sorted(_TOPS)}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    # each file under a temporary name, then renamed; the .json last: a killed export never leaves a
    # pair that looks complete (extract re-exports when a .json is missing)
    with atomic_path(Path(str(prefix) + ".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    meta = {"format": FORMAT, "kind": kind, "n_layers": n_layers, **info, "config": config}
    write_json_atomic(Path(str(prefix) + ".json"), meta, indent=2)


def load_top(path_prefix: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported top (see module docstring). Returned in train mode, like any fresh module;
    call `.eval()` to switch dropout off (BERT's layers have dropout 0.1)."""
    from safetensors.torch import load_file
    prefix = str(path_prefix).removesuffix(".json").removesuffix(".safetensors")
    meta_path = Path(prefix + ".json")
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: exported top layers not found; run stage 1 extraction "
                                "(it writes top_audio.* and top_text.* beside the features)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}; re-run extraction")
    kind, n = meta["kind"], meta["n_layers"]
    top = IdentityTop() if kind == "identity" or n == 0 else _TOPS[kind](_config(kind, meta["config"]), n)
    state = load_file(prefix + ".safetensors")
    missing, unexpected = top.load_state_dict(state, strict=False)
    # the rotary inverse frequencies are recomputed from the config, not stored
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"{prefix}.safetensors does not match its json: missing {missing}, unexpected {unexpected}")
    top.meta = meta
    return top.to(device=device, dtype=dtype)
