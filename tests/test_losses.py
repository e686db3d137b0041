"""Stage 2 losses on hand-made embeddings with known answers."""
import math

import pytest
import torch
import torch.nn.functional as F

from stage2_train.losses import (RetrievalLoss, build_term_masks, distinct_terms, hard_negative_loss,
                                 infonce, multi_positive_infonce, multi_positive_infonce_logits,
                                 rejection_loss, same_text_mask)


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def brute_force(logits, pos, ignore):
    """The documented formula, one pair at a time."""
    chunk_has_term = pos.any(1)
    neg = ~pos & ~ignore & chunk_has_term[:, None]
    a2t, t2a = [], []
    for b, m in pos.nonzero().tolist():
        s = logits[b, m]
        row = logits[b][neg[b]]
        col = logits[:, m][neg[:, m]]
        a2t.append(-(s - torch.logsumexp(torch.cat([s[None], row]), 0)))
        t2a.append(-(s - torch.logsumexp(torch.cat([s[None], col]), 0)))
    return (torch.stack(a2t).mean() + torch.stack(t2a).mean()) / 2


def test_perfect_alignment_is_near_zero_and_swapped_is_large():
    eye = torch.eye(4)
    pos = torch.eye(4, dtype=torch.bool)
    aligned = multi_positive_infonce(eye, eye, pos, None, logit_scale=100.0)
    swapped = multi_positive_infonce(eye[[1, 0, 3, 2]], eye, pos, None, logit_scale=100.0)
    assert aligned.item() < 1e-6
    assert swapped.item() > 90.0


def test_matches_brute_force_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    pos = torch.rand(6, 5, generator=g) < 0.3
    pos[5] = False                                       # a no-term chunk
    ignore = (torch.rand(6, 5, generator=g) < 0.2) & ~pos
    got = multi_positive_infonce_logits(logits, pos, ignore)
    assert torch.allclose(got, brute_force(logits, pos, ignore), atol=1e-5)


def test_two_positives_do_not_compete():
    # a chunk holding two terms scores both equally: no log(2) floor
    audio = unit([1.0, 1.0, 0.0])
    terms = torch.eye(3)
    pos = torch.tensor([[True, True, False]])
    loss = multi_positive_infonce(audio, terms, pos, None, logit_scale=100.0)
    assert loss.item() < 1e-6


def test_one_positive_per_row_is_clip_cross_entropy():
    g = torch.Generator().manual_seed(1)
    audio = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 20.0 * audio @ text.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(infonce(audio, text, 20.0), expected, atol=1e-5)


def test_infonce_same_text_is_not_a_negative():
    # chunks 0 and 1 carry the same sentence; their audio and text embeddings coincide
    audio = unit([1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    text = audio.clone()
    same = same_text_mask(["hello world", "hello world", "other"])
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    unmasked = infonce(audio, text, 100.0)
    masked = infonce(audio, text, 100.0, same)
    assert unmasked.item() > 0.4          # about log(2) on the two look-alike chunks
    assert masked.item() < 1e-6


def test_duplicate_column_is_masked_and_equals_distinct_columns():
    chunk_terms = [[5], [7], [5]]
    audio = unit([1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.9, 0.0, 0.3])
    term = {5: unit([1.0, 0.0, 0.0])[0], 7: unit([0.0, 1.0, 0.0])[0]}

    columns = [5, 7, 5]                                  # per occurrence
    pos, ignore = build_term_masks(chunk_terms, columns)
    assert pos[:, 2].sum() == 0 and ignore[:, 2].all()
    terms = torch.stack([term[t] for t in columns]).requires_grad_()
    per_occurrence = multi_positive_infonce(audio, terms, pos, ignore, 10.0)
    per_occurrence.backward()
    assert torch.equal(terms.grad[2], torch.zeros(3))

    moved = terms.detach().clone()
    moved[2] = unit([0.3, 0.3, 0.9])[0]                  # the duplicate's embedding changes
    assert torch.allclose(multi_positive_infonce(audio, moved, pos, ignore, 10.0), per_occurrence)

    columns = distinct_terms(chunk_terms)
    assert columns == [5, 7]
    pos, ignore = build_term_masks(chunk_terms, columns)
    assert pos.tolist() == [[True, False], [False, True], [True, False]]
    distinct = multi_positive_infonce(audio, torch.stack([term[t] for t in columns]), pos, ignore, 10.0)
    assert torch.allclose(distinct, per_occurrence, atol=1e-6)


def test_alias_of_a_positive_is_not_a_negative():
    equivalent = {9: 5}                                  # 9 is an alias of 5
    pos, ignore = build_term_masks([[5], [7]], [5, 7, 9], equivalent)
    assert pos.tolist() == [[True, False, False], [False, True, False]]
    assert ignore.tolist() == [[False, False, True], [False, False, False]]

    # chunk 0's only other column is the alias: its embedding must not matter
    pos, ignore = build_term_masks([[5], []], [5, 9], equivalent)
    audio = unit([1.0, 0.0, 0.0], [0.0, 0.0, 1.0])
    terms = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]).requires_grad_()
    loss = multi_positive_infonce(audio, terms, pos, ignore, 10.0)
    loss.backward()
    assert torch.equal(terms.grad[1], torch.zeros(3))
    on_top = unit([1.0, 0.0, 0.0], [1.0, 0.0, 0.0])       # alias scored as high as the positive
    assert torch.allclose(multi_positive_infonce(audio, on_top, pos, ignore, 10.0), loss)


def test_no_term_rows_contribute_nothing():
    terms = torch.eye(3)
    audio = unit([1.0, 0.2, 0.0], [0.1, 1.0, 0.0])
    pos, ignore = build_term_masks([[0], [1]], [0, 1, 2])
    base = multi_positive_infonce(audio, terms, pos, ignore, 10.0)

    noterm = unit([0.0, 0.0, 1.0]).requires_grad_()    # would be a strong negative if it counted
    pos2, ignore2 = build_term_masks([[0], [1], []], [0, 1, 2])
    assert not pos2[2].any()
    with_noterm = multi_positive_infonce(torch.cat([audio, noterm]), terms, pos2, ignore2, 10.0)
    assert torch.allclose(with_noterm, base)
    with_noterm.backward()
    assert torch.equal(noterm.grad, torch.zeros_like(noterm))

    only_noterm = multi_positive_infonce(noterm, terms, torch.zeros(1, 3, dtype=torch.bool), None, 10.0)
    assert only_noterm.item() == 0.0


def test_ignored_entries_get_zero_gradient():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 7, generator=g) * 2).requires_grad_()
    pos = torch.rand(6, 7, generator=g) < 0.3
    pos[4] = False                                       # no-term chunk
    ignore = (torch.rand(6, 7, generator=g) < 0.3) & ~pos
    multi_positive_infonce_logits(logits, pos, ignore).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[ignore] == 0).all()
    assert (logits.grad[4] == 0).all()
    assert (logits.grad[pos] < 0).all()                  # positives are pulled up
    assert (logits.grad[~pos & ~ignore & pos.any(1, keepdim=True)] > 0).all()


def test_rejection_hinge_is_zero_below_margin_and_linear_above():
    below = torch.tensor([[0.1, 0.25], [0.2, -0.3]])
    assert rejection_loss(below, margin=0.3).item() == 0.0
    for top in (0.4, 0.6, 0.9):
        scores = torch.tensor([[0.1, top], [0.0, 0.0]], requires_grad=True)
        loss = rejection_loss(scores, margin=0.3)
        assert loss.item() == pytest.approx((top - 0.3) / 2)
        loss.backward()
        assert scores.grad.tolist() == [[0.0, 0.5], [0.0, 0.0]]  # only the max, slope 1/B


def test_rejection_mask_and_empty():
    scores = torch.tensor([[0.9, 0.5], [0.95, 0.99]])
    mask = torch.tensor([[False, True], [False, False]])
    assert rejection_loss(scores, 0.3, mask).item() == pytest.approx(0.2)   # row 1 left out
    assert rejection_loss(torch.zeros(0, 4), 0.3).item() == 0.0


def test_hard_negative_loss_known_value_and_mask():
    audio = unit([1.0, 0.0, 0.0])
    terms = unit([1.0, 0.0, 0.0], [0.0, 0.0, 1.0])
    pos = torch.tensor([[True, False]])
    hard = unit([0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, -1.0, 0.0])[None]    # (1, 3, D)
    mask = torch.tensor([[True, True, False]])
    s = 10.0
    expected = -math.log(math.exp(s) / (math.exp(s) + math.exp(0.0) + math.exp(s / math.sqrt(2))))
    got = hard_negative_loss(audio, terms, pos, hard, s, mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # a chunk without positives or without valid hard negatives adds nothing
    none = hard_negative_loss(audio, terms, pos, hard, s, torch.zeros(1, 3, dtype=torch.bool))
    assert none.item() == 0.0


def test_retrieval_loss_combines_weighted_components():
    g = torch.Generator().manual_seed(3)
    audio = F.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    chunk_terms = [[0, 1], [1], [2], []]
    columns = distinct_terms(chunk_terms)
    terms = F.normalize(torch.randn(len(columns), 8, generator=g), dim=-1)
    pos, ignore = build_term_masks(chunk_terms, columns)
    hard = F.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    hard_mask = torch.tensor([[True, True, False]] * 4)

    loss_fn = RetrievalLoss(w_text=0.3, w_term=0.7, w_reject=0.5, w_hard=0.2, margin=-1.0)
    total, parts = loss_fn(audio, text, terms, pos, ignore, 14.0, hard=hard, hard_mask=hard_mask)
    assert set(parts) == {"audio_text", "audio_term", "reject", "hard", "total"}
    assert parts["total"] == pytest.approx(0.3 * parts["audio_text"] + 0.7 * parts["audio_term"]
                                           + 0.5 * parts["reject"] + 0.2 * parts["hard"], rel=1e-6)
    # the no-term chunk's rejection: max cosine over batch terms and its valid mined terms
    a3 = audio[3].detach()
    scores = torch.cat([a3 @ terms.T, hard[3, :2] @ a3])
    assert parts["reject"] == pytest.approx(float(scores.max() + 1.0), rel=1e-5)
    total.backward()
    assert torch.isfinite(audio.grad).all()

    # before the first mining: no hard negatives, rejection over batch terms only
    _, parts = loss_fn(audio, text, terms, pos, ignore, 14.0)
    assert parts["hard"] == 0.0
    assert parts["reject"] == pytest.approx(float((a3 @ terms.T).max() + 1.0), rel=1e-5)


def test_build_term_masks_rejects_a_term_without_column():
    with pytest.raises(ValueError, match="chunk 1"):
        build_term_masks([[1], [2]], [1])
