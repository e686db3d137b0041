"""The second stage: re-score the first stage's top-N glossary rows of a window by matching the sound pieces
of each form to the window's frames (late interaction).

The first stage compares one pooled vector per window with one per form: good at finding the neighbourhood
(R@10 ~.9 on the demo), weak at ordering similar forms, and weakest for forms it never heard. Here every
token of a form (an IPA character of its pronunciation, a letter of its spelling) is embedded with its
neighbours (a width-3 convolution over the tokens) and looks for its best frame among the window's frames
(a linear map and a width-3 convolution over time, both L2-normalised): the mean of those best cosines is
MaxSim (ColBERT), order-free. `monotonic` adds the same tokens matched in their order: each token takes a
frame no earlier than the one of the token before it (a max-plus recursion over frames, one cumulative max
per token), so a form whose pieces occur, but scrambled, scores lower.

The fused score is an affine mix of the first stage's cosine and these matching scores. It is absolute (not
relative to the window's other candidates), so one accept threshold, picked on dev, reads it for any window.

This module knows nothing of files beyond its checkpoint and nothing of ranks: `SecondStage` scores
(window frames, candidate rows) pairs; `Reranker` wraps it with a glossary's token table for stage 3:

    reranker = Reranker.load(run)                  # None when the run has no second stage (RUN/second.pt)
    table = reranker.token_table(forms)            # the glossary rows' forms: forms.json["glossary"] of a cache,
                                                   # or termside.forms_of(row texts, g2p) for a glossary file
    first, rows = <first-stage search, reranker.top_n rows per window>           # (W, N) cosines, row ids
    frames = tower_frames(model.audio, tap_items)  # what the audio tower pools (identity top: the items)
    fused = reranker.rescore(frames, rows, first, table)   # (W, N) scores: what the threshold reads
    rows, scores = rerank(rows, fused)             # best first; then termside.rows_to_terms as before

Trained by stage2_train/second.py (the trainer's phase after the first stage, `second.enabled`); measured
by stage3_index/second_eval.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shared.errors import BadInput

TOKEN_KINDS = ("phones", "chars")        # "phones": IPA characters of the pronunciation; "chars": letters
MATCHES = ("maxsim", "monotonic", "both")
PAD, UNK = 0, 1
CHECKPOINT = "second.pt"
_FORM_FIELD = {"phones": "phones", "chars": "spell"}
_NEG = -1e4         # a masked frame's similarity: far below any cosine, finite so sums stay finite


# ---------------------------------------------------------------- tokens

def kinds_of(tokens: str) -> list[str]:
    """The token kinds of `second.tokens` ("phones", "chars" or "both")."""
    if tokens == "both":
        return list(TOKEN_KINDS)
    if tokens in TOKEN_KINDS:
        return [tokens]
    raise BadInput(f"second.tokens {tokens!r}: choose phones, chars or both", file="config [second]",
                   fix="set second.tokens")


def build_vocab(texts_by_kind: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """{kind: {character: id}} (ids from 2; 0 pads, 1 is a character never seen when the vocabulary was made).
    Spaces are word breaks, not sounds: they are not tokens."""
    out = {}
    for kind, texts in texts_by_kind.items():
        chars = sorted({ch for t in texts for ch in (t or "") if not ch.isspace()})
        out[kind] = {ch: i + 2 for i, ch in enumerate(chars)}
    return out


def encode_texts(texts: list[str], vocab: dict[str, int], max_len: int) -> np.ndarray:
    """(len(texts), L) int64 token ids, right-padded with PAD, at most `max_len` tokens (an empty text keeps
    one UNK, so that every form has a token to match)."""
    seqs = []
    for t in texts:
        ids = [vocab.get(ch, UNK) for ch in (t or "") if not ch.isspace()][:max_len]
        seqs.append(ids or [UNK])
    L = max([len(s) for s in seqs], default=1)
    out = np.zeros((len(seqs), L), dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


# ---------------------------------------------------------------- matching (pure functions)

def maxsim(sim: torch.Tensor, token_mask: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean over a form's tokens of each token's best frame. sim (B, C, L, T) cosines; token_mask (B, C, L);
    frame_mask (B, T). Returns (B, C)."""
    best = sim.masked_fill(~frame_mask[:, None, None, :], _NEG).amax(-1)               # (B, C, L)
    tm = token_mask.to(sim.dtype)
    return (best * tm).sum(-1) / tm.sum(-1).clamp_min(1.0)


def monotonic(sim: torch.Tensor, token_mask: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the best in-order alignment: token i takes frame t_i with t_1 <= t_2 <= ... (a
    token may share its frame with the one before: a 25 Hz frame can hold two short phones).

        D_1(t) = s_1(t),  D_i(t) = s_i(t) + max_{t' <= t} D_{i-1}(t'),  score = max_t D_L(t) / L

    Padded tokens carry D on unchanged (tokens are right-padded, so they only follow real ones); masked
    frames never end an alignment. Shapes as `maxsim`."""
    s = sim.masked_fill(~frame_mask[:, None, None, :], _NEG)
    # unbind, not s[:, :, i]: each slice's backward would write a zero tensor of s's full size (L^2 work)
    cols, real = s.unbind(2), token_mask.unbind(2)
    d = cols[0]
    for i in range(1, len(cols)):
        carried = torch.cummax(d, dim=-1).values
        d = torch.where(real[i][..., None], cols[i] + carried, carried)
    tm = token_mask.to(sim.dtype)
    return d.amax(-1) / tm.sum(-1).clamp_min(1.0)


# ---------------------------------------------------------------- the module

class SecondStage(nn.Module):
    """Scores (window frames, candidate forms) pairs: mix . [first-stage cosine, matching scores] + bias.

    One token embedding table and convolution per token kind; one frame encoder shared by the kinds. The
    matching features per kind are MaxSim and/or the monotonic score (`match`); `mix` weighs them with the
    cosine. The bias does not change a ranking; it places the score for the accept threshold and for the
    no-candidate logit of training (`stage2_train/second.py`).
    """

    def __init__(self, audio_dim: int, vocab_sizes: dict[str, int], dim: int = 192, match: str = "maxsim"):
        super().__init__()
        if match not in MATCHES:
            raise BadInput(f"second.match {match!r}: choose {', '.join(MATCHES)}", file="config [second]",
                           fix="set second.match")
        self.kinds = list(vocab_sizes)
        self.match = match
        self.embed = nn.ModuleDict({k: nn.Embedding(n, dim, padding_idx=PAD) for k, n in vocab_sizes.items()})
        self.token_conv = nn.ModuleDict({k: nn.Conv1d(dim, dim, 3, padding=1) for k in self.kinds})
        self.frame_proj = nn.Linear(audio_dim, dim)
        self.frame_conv = nn.Conv1d(dim, dim, 3, padding=1)
        for conv in [*self.token_conv.values(), self.frame_conv]:
            nn.init.zeros_(conv.weight)        # start as the plain embedding / linear map; context is learnt
            nn.init.zeros_(conv.bias)
        per_kind = 2 if match == "both" else 1
        # the cosine keeps weight 1 at first (the first stage's order); the matching scores join at a
        # cosine-like scale, so early steps re-order only where the first stage hesitates
        self.mix = nn.Parameter(torch.tensor([10.0] + [10.0] * per_kind * len(self.kinds)))
        self.bias = nn.Parameter(torch.zeros(()))

    def n_features(self) -> int:
        return len(self.mix)

    def encode_frames(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, A) frames -> (B, T, D), L2-normalised (zero where masked)."""
        m = frame_mask[..., None].to(frames.dtype)
        x = self.frame_proj(frames) * m
        x = x + self.frame_conv(x.transpose(1, 2)).transpose(1, 2)
        return F.normalize(x, dim=-1) * m

    def encode_tokens(self, kind: str, ids: torch.Tensor) -> torch.Tensor:
        """(R, L) token ids -> (R, L, D), L2-normalised (zero at PAD).

        The width-3 convolution over token embeddings is computed by lookup: with a vocabulary of V tokens,
        conv(x)_i = b + W_0 e(c_{i-1}) + W_1 e(c_i) + W_2 e(c_{i+1}), and each W_k e(.) is a row of the
        (V, D) table E W_k^T. Making the three tables costs V D^2 per call, against R L D^2 for the
        convolution: a training step encodes ~10^3 forms of ~15 tokens over a vocabulary of ~60 (same
        function and parameters; tests compare it with the convolution)."""
        emb, conv = self.embed[kind], self.token_conv[kind]
        m = (ids != PAD)[..., None].to(emb.weight.dtype)
        w = emb.weight                                                   # (V, D), row PAD is zero
        V = len(w)
        tabs = torch.einsum("vd,edk->kve", w, conv.weight)               # (3, V, D): E W_k^T
        tabs = torch.cat([tabs[0], tabs[1] + w, tabs[2]])                # the token's own embedding joins W_1's
        prev = F.pad(ids, (1, 0), value=PAD)[:, :-1]
        nxt = F.pad(ids, (0, 1), value=PAD)[:, 1:]
        # one summing lookup of three rows per token (its backward is one scatter, not three)
        bag = F.embedding_bag(torch.stack([prev, ids + V, nxt + 2 * V], -1).view(-1, 3), tabs, mode="sum")
        x = (bag.view(*ids.shape, -1) + conv.bias) * m                   # E[PAD] = 0: padding stays 0
        return F.normalize(x, dim=-1)

    def features(self, frames_enc: torch.Tensor, frame_mask: torch.Tensor, tokens_enc: dict,
                 token_ids: dict) -> torch.Tensor:
        """Matching features (B, C, F) of each window's candidates: per kind, MaxSim and/or monotonic.
        frames_enc (B, T, D); tokens_enc[kind] (B, C, L, D) and token_ids[kind] (B, C, L) (PAD = no token)."""
        out = []
        for kind in self.kinds:
            t = tokens_enc[kind]
            tmask = token_ids[kind] != PAD
            sim = torch.einsum("bcld,btd->bclt", t, frames_enc)
            if self.match in ("maxsim", "both"):
                out.append(maxsim(sim, tmask, frame_mask))
            if self.match in ("monotonic", "both"):
                out.append(monotonic(sim, tmask, frame_mask))
        return torch.stack(out, dim=-1)

    def fuse(self, first: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The fused score (B, C) from the first stage's cosine (B, C) and the matching features (B, C, F)."""
        return torch.cat([first[..., None], feats], dim=-1) @ self.mix + self.bias

    def candidate_features(self, frames: torch.Tensor, frame_mask: torch.Tensor, rows: torch.Tensor,
                           tables: dict) -> torch.Tensor:
        """Matching features (B, C, F) of candidate rows `rows` (B, C) (-1 pads) for windows `frames` (B, T, A)
        / `frame_mask` (B, T); `tables[kind]` (R, L) are the token ids of all rows. Each distinct row is
        encoded once."""
        uniq, where = torch.unique(rows.clamp_min(0), return_inverse=True)
        f = self.encode_frames(frames, frame_mask)
        enc, ids = {}, {}
        for kind in self.kinds:
            u = tables[kind][uniq]
            u = u[:, :max(1, int((u != PAD).sum(1).max()))]          # no column of padding only
            e = self.encode_tokens(kind, u)
            # rows -> candidates as an embedding lookup (its backward is cheaper than indexing's)
            enc[kind] = F.embedding(where, e.reshape(len(e), -1)).view(*where.shape, *e.shape[1:])
            ids[kind] = u[where]
        return self.features(f, frame_mask, enc, ids)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, rows: torch.Tensor, tables: dict,
                first: torch.Tensor) -> torch.Tensor:
        """Fused scores (B, C) of candidate rows `rows` (B, C) (-1: no candidate, scored -inf), with `first`
        (B, C) their first-stage cosines; the rest as `candidate_features`."""
        fused = self.fuse(first, self.candidate_features(frames, frame_mask, rows, tables))
        return fused.masked_fill(rows < 0, float("-inf"))


# ---------------------------------------------------------------- checkpoint and stage 3's wrapper

def spec_of(audio_dim: int, vocab: dict, dim: int, match: str, max_len: int, top_n: int) -> dict:
    return {"audio_dim": audio_dim, "vocab": vocab, "dim": dim, "match": match, "max_len": max_len,
            "top_n": top_n}


def build(spec: dict) -> SecondStage:
    return SecondStage(spec["audio_dim"], {k: len(v) + 2 for k, v in spec["vocab"].items()}, spec["dim"],
                       spec["match"])


def save(module: SecondStage, spec: dict, path: str | Path, extra: dict | None = None) -> None:
    """Only the trained weights and what rebuilds the module (written atomically)."""
    from shared.atomic import atomic_path
    with atomic_path(Path(path)) as tmp:
        torch.save({"model": module.state_dict(), "spec": spec, **(extra or {})}, tmp)


@dataclass
class Reranker:
    """A trained second stage ready for stage 3: token tables of a glossary, re-scoring of candidate rows."""
    module: SecondStage
    spec: dict
    info: dict

    @property
    def top_n(self) -> int:
        """How many first-stage rows per window it re-scores (`second.top_n` at training)."""
        return int(self.spec["top_n"])

    @classmethod
    def from_file(cls, path: str | Path) -> "Reranker":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        module = build(ckpt["spec"])
        module.load_state_dict(ckpt["model"])
        return cls(module.eval(), ckpt["spec"], {k: v for k, v in ckpt.items() if k not in ("model", "spec")})

    @classmethod
    def load(cls, run: str | Path, path: str | Path | None = None) -> "Reranker | None":
        """The run's second stage (RUN/second.pt, or `path`); None when the run has none. Refused when it was
        trained on another first-stage checkpoint than the run's (its cosines and frames would differ)."""
        p = Path(path) if path is not None else Path(run) / CHECKPOINT
        if not p.is_file():
            if path is not None:
                raise BadInput("no second-stage checkpoint here", file=p,
                               fix="train one (train with --set second.enabled=true, or python -m stage2_train.second)")
            return None
        out = cls.from_file(p)
        made_on = out.info.get("first_stage")
        if made_on is not None:
            from shared.heads import checkpoint_path
            now = first_stage_id(checkpoint_path(run))
            if now != made_on:
                raise BadInput(f"the second stage was trained on first-stage checkpoint {made_on['name']} "
                               f"{made_on['sha256'][:12]}, the run now has {now['name']} {now['sha256'][:12]}",
                               file=p, fix="train it again: python -m stage2_train.second --run RUN --force")
        return out

    def token_table(self, forms: dict) -> dict[str, torch.Tensor]:
        """Token ids (R, L) per kind of a glossary's rows from their forms ({"spell": [...], "phones": [...]},
        as forms.json or termside.forms_of give them)."""
        out = {}
        for kind in self.module.kinds:
            texts = forms.get(_FORM_FIELD[kind])
            if texts is None:
                raise BadInput(f"the second stage reads {kind} but the glossary's forms have none", file="forms",
                               fix="extract with text.g2p = espeak (phones need a G2P)")
            out[kind] = torch.from_numpy(encode_texts(texts, self.spec["vocab"][kind], self.spec["max_len"]))
        return out

    @torch.no_grad()
    def rescore(self, frames: list[np.ndarray], rows: np.ndarray, first: np.ndarray, table: dict) -> np.ndarray:
        """(W, N) fused scores of each window's candidate rows. frames: per window (T, A) states (what the
        first stage's audio tower pools, after its top layers); rows (W, N) glossary row ids (-1: none, scored
        -inf); first (W, N) their first-stage cosines; table from `token_table`."""
        from shared.heads import pad_batch
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros(rows.shape, dtype=np.float32)
        x, m = pad_batch(list(frames))
        s = self.module(x, m, torch.from_numpy(rows), table, torch.from_numpy(np.asarray(first, np.float32)))
        return s.float().numpy()


def first_stage_id(checkpoint: str | Path) -> dict:
    """Which first-stage checkpoint a second stage was trained on (its name and sha256)."""
    from shared.cache import file_sha256
    return {"name": Path(checkpoint).name, "sha256": file_sha256(checkpoint)}


def rerank(rows: np.ndarray, fused: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each window's candidate rows (W, N) and fused scores sorted best first (ties keep the first stage's
    order)."""
    order = np.argsort(-fused, axis=1, kind="stable")
    return np.take_along_axis(rows, order, 1), np.take_along_axis(fused, order, 1)


@torch.no_grad()
def tower_frames(tower, items: list[np.ndarray]) -> list[np.ndarray]:
    """What the first stage's audio tower pools: cached tap states through its top layers (identity when
    stage 2 trained heads only on the final states). The second stage reads these frames."""
    from shared.heads import pad_batch
    if not list(tower.top.parameters()):
        return [np.asarray(x, dtype=np.float32) for x in items]
    out = []
    for b in range(0, len(items), 64):
        x, m = pad_batch(items[b:b + 64])
        y, ym = tower.top(x, m)
        out += [y[i][ym[i]].float().numpy() for i in range(len(y))]
    return out
