"""Heads rewritten for speed compute the function of their plain form."""
import math

import torch

from shared.heads import AttentivePool


def test_attentive_pool_scores_frames_as_keyed_frames_against_the_queries():
    torch.manual_seed(0)
    for heads in (1, 3):
        pool = AttentivePool(12, heads)
        with torch.no_grad():
            pool.query.normal_()
        x = torch.randn(4, 9, 12, requires_grad=True)
        mask = torch.ones(4, 9, dtype=torch.bool)
        mask[1, 5:] = False
        mask[3, 1:] = False
        out = pool(x, mask)
        # the plain form: key every frame, then score it against each query
        q = pool.query if heads > 1 else pool.query[None]
        scores = (pool.key(x) @ q.T / math.sqrt(12)).masked_fill(~mask[..., None], torch.finfo(x.dtype).min)
        w = torch.softmax(scores, dim=1) * mask[..., None]
        ref = (torch.einsum("bth,btd->bhd", w, x) / w.sum(1)[..., None]).reshape(4, -1)
        assert torch.allclose(out.reshape(4, -1), ref, atol=1e-5)
        g_out = torch.autograd.grad(out.sum(), [x, pool.key.weight, pool.query])
        g_ref = torch.autograd.grad(ref.sum(), [x, pool.key.weight, pool.query])
        for a, b in zip(g_out, g_ref):
            assert torch.allclose(a, b, atol=1e-5)
