"""The training objectives of stage 2, each a formula over already-gathered embeddings.

This module owns the four losses and how they combine:

    total = w_text * audio_text + w_term * audio_term + w_reject * reject + w_hard * hard

and the small helpers that turn a batch's term lists into masks. It knows nothing about ranks,
files or configs: the training loop gathers embeddings across ranks first (so negatives come
from the global batch) and passes them in, as in open_clip.

Conventions shared by every function here:
- embeddings are L2-normalised, so `audio @ terms.T` is a cosine in [-1, 1];
- `logit_scale` is the multiplier 1/temperature (open_clip's `logit_scale.exp()`), a float or a
  0-d tensor, never its log;
- logits are computed in float32 whatever the embeddings' dtype: under bf16 autocast the small
  gaps between a positive and its hard negatives would otherwise round away;
- `pos[b, m]` marks chunk b and term column m as a positive pair; `ignore[b, m]` marks a pair that
  is neither positive nor negative (a duplicate column, an alias of one of b's terms). Where both
  are set, the pair is a positive.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Logit given to pairs that are not compared. Finite on purpose: a row with nothing to compare
# then has log-sum-exp ~ -1e9, softplus(-1e9 - s) = 0 with a zero (not NaN) gradient, which -inf
# would not give through logsumexp's backward.
_NOT_COMPARED = -1e9


def _masked_logsumexp(logits: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(logits.masked_fill(~keep, _NOT_COMPARED), dim=dim)


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A zero that stays in the graph, so `loss.backward()` works on a batch without such pairs."""
    return like.sum() * 0.0


# ----------------------------------------------------------------------------- audio <-> term

def multi_positive_infonce_logits(logits: torch.Tensor, pos: torch.Tensor,
                                  ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-positive InfoNCE on a (B, M) logit matrix, both directions, averaged.

    For every positive pair (b, m), with N(b) the negatives of row b and N(m) those of column m:

        audio->term  l_bm = -log( e^{s_bm} / (e^{s_bm} + sum_{n in N(b)} e^{s_bn}) )
        term->audio  l_mb = -log( e^{s_bm} / (e^{s_bm} + sum_{n in N(m)} e^{s_nm}) )
        loss = ( mean_{(b,m) pos} l_bm + mean_{(b,m) pos} l_mb ) / 2

    A negative is any pair that is neither positive nor ignored, in a row that has a positive.

    Why each positive against the negatives only (not -log of the summed positives, nor a softmax
    that also holds the other positives): evaluation counts every (chunk, term) pair as a query,
    so each of a chunk's terms must outscore the negatives on its own. Summing the positives lets
    one easy term carry the chunk; a softmax over all of them makes a chunk's two terms compete
    and puts a floor of log(P) under the loss. This form reaches 0 when every positive beats every
    negative, and with one positive per row it is exactly the usual cross-entropy InfoNCE.

    Rows with no positive (no-term chunks) add no loss and are nobody's negative here: they are
    the rejection loss's business, so this value does not move with the batch's share of no-term
    chunks. A column with no positive adds nothing either.
    """
    pos = pos.bool()
    if not bool(pos.any()):
        return _zero(logits)
    ignore = torch.zeros_like(pos) if ignore is None else ignore.bool()
    logits = logits.float()
    chunk_has_term = pos.any(dim=1, keepdim=True)
    neg = ~pos & ~ignore & chunk_has_term
    row_neg = _masked_logsumexp(logits, neg, dim=1)[:, None]    # (B, 1)
    col_neg = _masked_logsumexp(logits, neg, dim=0)[None, :]    # (1, M)
    # -log(e^s / (e^s + e^L)) = softplus(L - s)
    audio_to_term = F.softplus(row_neg - logits)[pos].mean()
    term_to_audio = F.softplus(col_neg - logits)[pos].mean()
    return (audio_to_term + term_to_audio) / 2


def multi_positive_infonce(audio: torch.Tensor, terms: torch.Tensor, pos: torch.Tensor,
                           ignore: torch.Tensor | None, logit_scale) -> torch.Tensor:
    """Audio-term loss: chunk audio (B, D) against the batch's term columns (M, D).

    See `multi_positive_infonce_logits` for the formula; `pos`/`ignore` come from
    `build_term_masks`.
    """
    logits = logit_scale * (audio.float() @ terms.float().T)
    return multi_positive_infonce_logits(logits, pos, ignore)


# ----------------------------------------------------------------------------- audio <-> text

def infonce(audio: torch.Tensor, text: torch.Tensor, logit_scale,
            same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between chunk audio (B, D) and the same chunks' text (B, D).

    Chunk i's audio and text are the positive pair, every other chunk is a negative, except
    chunks whose text is identical to chunk i's (`same[i, j]`, see `same_text_mask`): they
    would be positives dressed as negatives, so they are left out of the denominators. With
    `same=None` this is open_clip's ClipLoss.
    """
    logits = logit_scale * (audio.float() @ text.float().T)
    diagonal = torch.eye(len(audio), dtype=torch.bool, device=logits.device)
    ignore = None if same is None else same.bool() & ~diagonal
    return multi_positive_infonce_logits(logits, diagonal, ignore)


# ----------------------------------------------------------------------------- rejection

def rejection_loss(scores: torch.Tensor, margin: float,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge that pushes no-term chunks below `margin` against every glossary term.

        loss = mean_b relu( max_k s_bk - margin )

    `scores` (B_noterm, K) are COSINE similarities (not multiplied by logit_scale) between each
    no-term chunk and its nearest glossary terms, and `margin` is a cosine too, so the margin means
    the same thing whatever temperature is learnt. Only the max matters: at inference a chunk is
    accepted when its best term clears the threshold. `mask` (B_noterm, K) marks valid entries
    (mined lists are -1 filled); rows with no valid entry are left out of the mean.
    """
    if scores.numel() == 0:
        return _zero(scores)
    scores = scores.float()
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    rows = mask.any(dim=1)
    if not bool(rows.any()):
        return _zero(scores)
    best = scores.masked_fill(~mask, float("-inf")).max(dim=1).values[rows]
    return F.relu(best - margin).mean()


# ----------------------------------------------------------------------------- hard negatives

def hard_negative_loss(audio: torch.Tensor, terms: torch.Tensor, pos: torch.Tensor,
                       hard: torch.Tensor, logit_scale,
                       hard_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each positive pair against the chunk's mined hard negatives only, audio->term.

        loss = mean_{(b,m) pos} -log( e^{s_bm} / (e^{s_bm} + sum_h e^{s_bh}) )

    `hard` (B, H, D) holds, per chunk, the embeddings of glossary terms that score highest for it
    but are not its terms nor their aliases (`mining.mine_hard_negatives`); `hard_mask` (B, H)
    marks the valid ones. Kept apart from the in-batch audio-term loss rather than appended to
    its denominator, which would tie its weight to `w_term`: this way `w_hard` weighs it and it is
    logged on its own. Pairs whose chunk has no valid hard negative are left out of the mean.
    """
    pos = pos.bool()
    audio = audio.float()
    if hard_mask is None:
        hard_mask = torch.ones(hard.shape[:2], dtype=torch.bool, device=hard.device)
    hard_mask = hard_mask.bool()
    pairs = pos & hard_mask.any(dim=1, keepdim=True)
    if not bool(pairs.any()):
        return _zero(audio) + _zero(hard)
    pos_logits = logit_scale * (audio @ terms.float().T)                            # (B, M)
    hard_logits = logit_scale * torch.einsum("bd,bhd->bh", audio, hard.float())     # (B, H)
    hard_lse = _masked_logsumexp(hard_logits, hard_mask, dim=1)[:, None]
    return F.softplus(hard_lse - pos_logits)[pairs].mean()


# ----------------------------------------------------------------------------- all together

class RetrievalLoss(nn.Module):
    """total = w_text*audio_text + w_term*audio_term + w_reject*reject + w_hard*hard.

    Takes already-gathered embeddings of one (global) batch; knows nothing about ranks.
    `forward` returns (total, components) where components holds each unweighted loss and the
    total as floats, for logging. Every component is computed whenever its inputs are given,
    even at weight 0, so a run logs what it is not optimising too; a missing input logs 0.

    The mined neighbours `hard` (B, H, D) serve both kinds of chunk: for a chunk with terms they
    are its hard negatives; for a no-term chunk (no positive in `pos`) nothing in the glossary is
    a positive, so they are simply its nearest glossary terms, and the rejection hinge runs on its
    cosines to them and to the batch's term columns. Before the first mining (`hard=None`) the
    rejection uses the batch's term columns alone.
    """

    def __init__(self, w_text: float = 0.3, w_term: float = 0.7, w_reject: float = 0.1,
                 w_hard: float = 0.1, margin: float = 0.3):
        super().__init__()
        self.w_text, self.w_term, self.w_reject, self.w_hard = w_text, w_term, w_reject, w_hard
        self.margin = margin  # cosine, see rejection_loss

    def forward(self, audio: torch.Tensor, text: torch.Tensor | None, terms: torch.Tensor,
                pos: torch.Tensor, ignore: torch.Tensor | None, logit_scale, *,
                text_same: torch.Tensor | None = None, hard: torch.Tensor | None = None,
                hard_mask: torch.Tensor | None = None):
        """audio (B, D), text (B, D) chunk text, terms (M, D) term columns, pos/ignore (B, M)
        from `build_term_masks`, text_same (B, B) from `same_text_mask`, hard (B, H, D) with
        hard_mask (B, H) for -1 filled mined lists."""
        pos = pos.bool()
        ignore = torch.zeros_like(pos) if ignore is None else ignore.bool()
        zero = _zero(audio)

        audio_text = infonce(audio, text, logit_scale, text_same) if text is not None else zero
        audio_term = multi_positive_infonce(audio, terms, pos, ignore, logit_scale)

        hard_loss = zero
        if hard is not None:
            hard_loss = hard_negative_loss(audio, terms, pos, hard, logit_scale, hard_mask)

        noterm = ~pos.any(dim=1)
        scores = audio[noterm].float() @ terms.float().T
        mask = ~ignore[noterm]
        if hard is not None:
            hm = (torch.ones(hard.shape[:2], dtype=torch.bool, device=hard.device)
                  if hard_mask is None else hard_mask.bool())
            hard_scores = torch.einsum("bd,bhd->bh", audio[noterm].float(), hard[noterm].float())
            scores = torch.cat([scores, hard_scores], dim=1)
            mask = torch.cat([mask, hm[noterm]], dim=1)
        reject = rejection_loss(scores, self.margin, mask)

        total = (self.w_text * audio_text + self.w_term * audio_term
                 + self.w_reject * reject + self.w_hard * hard_loss)
        parts = {"audio_text": audio_text, "audio_term": audio_term, "reject": reject,
                 "hard": hard_loss, "total": total}
        return total, {name: float(value.detach()) for name, value in parts.items()}


# ----------------------------------------------------------------------------- masks

def distinct_terms(chunk_terms: Sequence[Sequence[int]]) -> list[int]:
    """The batch's term ids, each once, in order of first appearance: the usual term columns."""
    return list(dict.fromkeys(t for terms in chunk_terms for t in terms))


def build_term_masks(chunk_terms: Sequence[Sequence[int]], batch_term_ids: Sequence[int],
                     equivalent: Mapping[int, int] | None = None,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos, ignore), both (B, M) bool, for chunks' term ids against the batch's term columns.

    Columns are meant to be the DISTINCT term ids of the batch (`distinct_terms`), so a term that
    occurs in two chunks is one column, positive for both, and duplicates merge by construction.
    Columns given per occurrence work too: every repeat of an id after its first column is
    ignored in every row, so it is never a negative and gets no gradient.

    `equivalent` maps a term id to its group id (its main term's id; ids not in it are their own
    group). Two different ids of one group are never negatives of each other: for a chunk with
    term t, the other ids of t's group are ignored (neither positive nor negative). Our manifests
    already hold canonical main ids, so this is for glossaries whose aliases kept their own ids.
    A chunk with no terms (no-term chunk) gets an all-False `pos` row.
    """
    cols = np.asarray(list(batch_term_ids), dtype=np.int64)
    group = (lambda t: t) if not equivalent else (lambda t: equivalent.get(t, t))
    col_groups = np.asarray([group(int(t)) for t in cols], dtype=np.int64)
    _, first = np.unique(cols, return_index=True)
    repeat = np.ones(len(cols), dtype=bool)
    repeat[first] = False
    known = set(cols.tolist())

    pos = np.zeros((len(chunk_terms), len(cols)), dtype=bool)
    ignore = np.zeros_like(pos)
    for b, terms in enumerate(chunk_terms):
        terms = [int(t) for t in terms]
        missing = [t for t in terms if t not in known]
        if missing:
            raise ValueError(f"chunk {b} of the batch: term ids {missing} are not among the batch's "
                             f"term columns; build the columns with distinct_terms(chunk_terms)")
        is_term = np.isin(cols, terms)
        pos[b] = is_term & ~repeat
        ignore[b] = repeat | (np.isin(col_groups, [group(t) for t in terms]) & ~is_term)
    return torch.from_numpy(pos).to(device), torch.from_numpy(ignore).to(device)


def same_text_mask(keys: Sequence[Hashable], device: torch.device | str | None = None) -> torch.Tensor:
    """(B, B) bool: chunks i and j carry the same text (or any other equal key), for `infonce`."""
    index: dict = {}
    codes = torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long,
                         device=device)
    return codes[:, None] == codes[None, :]
