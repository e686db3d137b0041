"""The second stage: its matching functions against plain loops, learning where the first stage cannot,
switched off, saved and loaded, trained by the trainer as a phase after the first stage."""
import itertools

import numpy as np
import pytest
import torch

from shared import second_stage as ss
from stage2_train.second import (candidate_lists, candidate_loss, length_batches, null_candidate_loss,
                                 sound_neighbours)


def _random_case(seed=0, B=3, C=4, L=6, T=9):
    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(B, C, L, T, generator=g) * 2 - 1
    tlen = torch.randint(1, L + 1, (B, C), generator=g)
    flen = torch.randint(1, T + 1, (B,), generator=g)
    tmask = torch.arange(L)[None, None, :] < tlen[..., None]
    fmask = torch.arange(T)[None, :] < flen[:, None]
    return sim, tmask, fmask, tlen, flen


def test_maxsim_with_masks_equals_a_plain_loop():
    sim, tmask, fmask, tlen, flen = _random_case()
    got = ss.maxsim(sim, tmask, fmask)
    for b, c in itertools.product(range(sim.shape[0]), range(sim.shape[1])):
        best = [max(float(sim[b, c, i, t]) for t in range(int(flen[b]))) for i in range(int(tlen[b, c]))]
        assert float(got[b, c]) == pytest.approx(sum(best) / len(best), abs=1e-6)


def test_monotonic_equals_the_best_ordered_alignment_found_by_brute_force():
    sim, tmask, fmask, tlen, flen = _random_case(seed=1, L=4, T=5)
    got = ss.monotonic(sim, tmask, fmask)
    for b, c in itertools.product(range(sim.shape[0]), range(sim.shape[1])):
        n, T = int(tlen[b, c]), int(flen[b])
        best = max(sum(float(sim[b, c, i, t]) for i, t in enumerate(path))
                   for path in itertools.combinations_with_replacement(range(T), n))   # t_1 <= ... <= t_n
        assert float(got[b, c]) == pytest.approx(best / n, abs=1e-5)
    assert (got <= ss.maxsim(sim, tmask, fmask) + 1e-6).all()     # an ordered alignment is one of MaxSim's


def _toy(seed, n_windows, vocab=10, L=5, C=6, dim=16, noise=0.3, anagrams=False):
    """Windows whose frames spell their form's tokens (a random prototype per token, some silence around);
    candidates: the form and C-1 others (other random forms, or anagrams of it). The first stage's cosine is
    the same for every candidate: it cannot tell them apart."""
    protos = np.random.default_rng(99).standard_normal((vocab + 2, dim)).astype(np.float32)   # one "voice"
    rng = np.random.default_rng(seed)
    forms, frames, rows = [], [], []
    for w in range(n_windows):
        form = rng.integers(2, vocab + 2, L)
        if anagrams:
            others = []
            while len(others) < C - 1:
                p = rng.permutation(form)
                if not (p == form).all():
                    others.append(p)
        else:
            others = [rng.integers(2, vocab + 2, L) for _ in range(C - 1)]
        base = len(forms)
        forms += [form] + others
        seq = np.repeat(protos[form], 2, axis=0)
        pad = rng.standard_normal((rng.integers(1, 4), dim)).astype(np.float32) * 0.3
        frames.append(np.concatenate([pad, seq, pad]) + noise * rng.standard_normal((len(seq) + 2 * len(pad), dim)).astype(np.float32))
        order = rng.permutation(C)
        rows.append((base + order).tolist())
    table = {"phones": torch.from_numpy(np.stack(forms).astype(np.int64))}
    rows = np.asarray(rows)
    pos = np.zeros_like(rows, dtype=bool)
    for w in range(n_windows):
        pos[w] = rows[w] == w * C
    return frames, rows, pos, table


def _train_toy(match, anagrams, steps=60, seed=0):
    torch.manual_seed(seed)
    frames, rows, pos, table = _toy(seed, 96, anagrams=anagrams)
    m = ss.SecondStage(16, {"phones": 12}, dim=32, match=match)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = torch.full(rows.shape, 0.5)
    from shared.heads import pad_batch
    x, fm = pad_batch(frames)
    for _ in range(steps):
        loss = candidate_loss(m(x, fm, torch.from_numpy(rows), table, first), torch.from_numpy(pos),
                              torch.ones(rows.shape, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tf, trows, tpos, ttable = _toy(seed + 100, 64, anagrams=anagrams)
    x, fm = pad_batch(tf)
    with torch.no_grad():
        s = m.eval()(x, fm, torch.from_numpy(trows), ttable, torch.full(trows.shape, 0.5))
    return float(tpos[np.arange(len(trows)), s.argmax(1).numpy()].mean())


def test_the_second_stage_learns_to_rank_the_spoken_form_first_where_the_first_stage_cannot():
    # first-stage cosines are all equal: its top-1 is right 1 time in 6; the matching finds the form
    assert _train_toy("maxsim", anagrams=False) >= 0.9


def test_order_aware_matching_tells_a_form_from_its_anagrams_where_maxsim_cannot():
    # an anagram has the same tokens, so MaxSim ties it with the form; only the order separates them
    assert _train_toy("monotonic", anagrams=True) >= 0.8
    assert _train_toy("maxsim", anagrams=True) <= 0.6


def test_a_mix_without_matching_weight_gives_the_first_stage_order_and_score():
    frames, rows, _, table = _toy(3, 8)
    m = ss.SecondStage(16, {"phones": 12}, dim=8)
    with torch.no_grad():
        m.mix.copy_(torch.tensor([1.0, 0.0]))
    first = np.random.default_rng(0).random(rows.shape).astype(np.float32)
    r = ss.Reranker(m.eval(), ss.spec_of(16, {"phones": {}}, 8, "maxsim", 8, 6), {})
    fused = r.rescore(frames, rows, first, table)
    np.testing.assert_allclose(fused, first, atol=1e-6)
    reranked, _ = ss.rerank(rows, fused)
    np.testing.assert_array_equal(reranked, np.take_along_axis(rows, np.argsort(-first, 1), 1))


def test_save_and_load_give_identical_scores_and_pads_score_minus_inf(tmp_path):
    frames, rows, _, _ = _toy(4, 5)
    vocab = {"phones": {ch: i + 2 for i, ch in enumerate("abcdefghij")}, "chars": {ch: i + 2 for i, ch in enumerate("xyz")}}
    spec = ss.spec_of(16, vocab, 24, "both", 8, 6)
    m = ss.build(spec)
    for p in m.parameters():                       # not the initial zeros of the convolutions
        p.data.normal_(0, 0.3)
    forms = {"phones": ["abc", "de fg", "hij", "", "aaj", "bcd"] * 6, "spell": ["xy", "z", "q", "x y", "yy", "zx"] * 6}
    rows[0, -1] = -1
    first = np.random.default_rng(1).random(rows.shape).astype(np.float32)
    a = ss.Reranker(m.eval(), spec, {})
    ss.save(m, spec, tmp_path / "second.pt", {"config": {"top_n": 6}})
    b = ss.Reranker.load(tmp_path, tmp_path / "second.pt")
    sa = a.rescore(frames, rows, first, a.token_table(forms))
    sb = b.rescore(frames, rows, first, b.token_table(forms))
    np.testing.assert_array_equal(sa, sb)
    assert sa[0, -1] == -np.inf and np.isfinite(sa[rows >= 0]).all()
    assert b.top_n == 6 and b.info["config"] == {"top_n": 6}
    assert ss.Reranker.load(tmp_path / "nothing") is None


def test_candidate_loss_is_each_positive_against_the_negatives():
    s = torch.tensor([[2.0, 1.0, 0.5, 9.0], [0.0, 3.0, 1.0, 0.0]])
    pos = torch.tensor([[True, True, False, False], [False, True, False, False]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    per = [-np.log(np.exp(2) / (np.exp(2) + np.exp(0.5))), -np.log(np.exp(1) / (np.exp(1) + np.exp(0.5))),
           -np.log(np.exp(3) / (np.exp(3) + 1 + np.e + 1))]
    assert float(candidate_loss(s, pos, valid)) == pytest.approx(np.mean(per), rel=1e-5)
    assert float(candidate_loss(s, torch.zeros_like(pos), valid)) == 0.0


def test_candidate_lists_put_positives_first_and_drop_unspoken_aliases_of_the_chunk_terms():
    owner = np.array([0, 1, 2, 3, 0, 2])                         # rows 4 and 5 are aliases of terms 0 and 2
    first = np.array([[4, 1, 2, -1], [3, 5, 1, 0]])
    rows, pos = candidate_lists(first, [[0], [5]], owner, [[0], [2]], extra={0: [3, 1], 5: [0]})
    assert rows[0].tolist()[:4] == [0, 1, 2, 3] and pos[0].tolist()[:4] == [True, False, False, False]
    assert rows[1].tolist()[:4] == [5, 3, 1, 0] and pos[1].tolist()[:4] == [True, False, False, False]
    assert 4 not in rows[0] and 2 not in rows[1]                  # other forms of the chunk's own term


def test_sound_neighbours_are_the_nearest_pronunciations_but_never_the_row_itself():
    texts = ["kat", "kæt", "dɔg", "kats", "bɜːd"]
    got = sound_neighbours(texts, np.array([0, 2]), np.arange(5), 2)
    assert got[0] == [1, 3] or got[0] == [3, 1]
    assert 2 not in got[2] and len(got[2]) == 2


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    from tests.synthetic import build_cache
    return build_cache(tmp_path_factory.mktemp("syn2"), audio_top=False)


def test_the_second_stage_is_a_phase_after_the_first_that_never_changes_it(features, tmp_path):
    """Off: no second.pt, the reranker is None (stage 3 keeps the first stage). Switched on when resuming the
    finished run: only the second stage trains, best.pt stays as it was, the run is finished again."""
    from shared.config import load_config
    from stage2_train.train import train
    from stage3_index.second_eval import measure
    sets = {"train.epochs": 1, "train.batch_size": 32, "train.warmup_steps": 2, "train.hard_refresh": 3,
            "train.hard_k": 4, "train.proj_dim": 16, "train.in_memory": "yes", "second.epochs": 1, "second.dim": 16,
            "second.top_n": 6, "second.sound_k": 2}
    run = tmp_path / "run"
    train(load_config(None, [f"{k}={v}" for k, v in sets.items()]), features, run, log=lambda *_: None)
    assert (run / "finished.json").is_file() and not (run / "second.pt").exists()
    assert ss.Reranker.load(run) is None
    before = (run / "best.pt").read_bytes()
    (run / "finished.json").unlink()
    train(load_config(None, [f"{k}={v}" for k, v in {**sets, "second.enabled": True}.items()]), features, run,
          resume=True, log=lambda *_: None)
    assert (run / "best.pt").read_bytes() == before
    assert (run / "second.pt").is_file() and (run / "finished.json").is_file()
    saved = torch.load(run / "second.pt", weights_only=False)
    assert saved["config"]["top_n"] == 6 and set(saved["spec"]["vocab"]) == {"phones"}
    # only trained weights: no optimizer state, no frames, no first-stage parameters
    assert set(saved) == {"model", "spec", "config", "figures", "first_stage"}
    assert all(not k.startswith(("audio.", "text.")) for k in saved["model"])
    res = measure(run, ["test"], timing=False, log=lambda *_: None)["test"]
    assert set(res) >= {"first", "second", "recall_at_n"} and 0.0 <= res["second"]["r1"] <= res["recall_at_n"] + 1e-9
    # a first stage that changed under it: refused, not silently mixed
    ckpt = torch.load(run / "best.pt", weights_only=False)
    ckpt["state"]["step"] += 1
    torch.save(ckpt, run / "best.pt")
    from shared.errors import BadInput
    with pytest.raises(BadInput, match="trained on first-stage checkpoint"):
        ss.Reranker.load(run)


def test_tokens_encoded_by_lookup_equal_the_convolution_over_their_embeddings():
    m = ss.SecondStage(8, {"phones": 7}, dim=12)
    for p in m.parameters():
        p.data.normal_(0, 0.5)
    m.embed["phones"].weight.data[ss.PAD] = 0            # what padding_idx keeps
    ids = torch.tensor([[2, 3, 4, 5, 0, 0], [6, 1, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3]])
    e = m.embed["phones"](ids)
    mask = (ids != ss.PAD)[..., None].float()
    plain = e + m.token_conv["phones"](e.transpose(1, 2)).transpose(1, 2) * mask
    plain = torch.nn.functional.normalize(plain, dim=-1) * mask
    torch.testing.assert_close(m.encode_tokens("phones", ids), plain, atol=1e-5, rtol=1e-5)


def test_null_candidate_loss_puts_a_zero_score_none_in_every_list():
    s = torch.tensor([[2.0, 1.0, -1.0], [0.5, -2.0, 9.0]])
    pos = torch.tensor([[True, False, False], [False, False, False]])       # row 1: a no-term chunk
    valid = torch.tensor([[True, True, True], [True, True, False]])
    term = -np.log(np.exp(2) / (np.exp(2) + np.exp(1) + np.exp(-1) + 1))
    none = np.log(1 + np.exp(0.5) + np.exp(-2))
    assert float(null_candidate_loss(s, pos, valid, 0.5)) == pytest.approx(term + 0.5 * none, rel=1e-5)
    # a no-term chunk scoring all its candidates far below 0 costs nothing; above 0, it costs
    low = null_candidate_loss(torch.tensor([[-20.0, -30.0]]), torch.zeros(1, 2, dtype=torch.bool),
                              torch.ones(1, 2, dtype=torch.bool), 1.0)
    high = null_candidate_loss(torch.tensor([[3.0, -30.0]]), torch.zeros(1, 2, dtype=torch.bool),
                               torch.ones(1, 2, dtype=torch.bool), 1.0)
    assert float(low) < 1e-6 < 3.0 < float(high)


def test_length_batches_cover_every_item_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 100, 1000)
    batches = length_batches(lengths, 32, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    plain = sum(32 * lengths[rng.permutation(1000)[:32]].max() for _ in range(len(batches)))
    assert padded < 0.8 * plain                 # sorted within pools: far less padding than random batches
    again = length_batches(lengths, 32, np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(batches, again))
