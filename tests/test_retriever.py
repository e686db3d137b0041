"""The retriever on a synthesised WAV whose 'term' (a tone band) sounds at a known time: merged terms,
top-K per window, and the live stream (same windows and candidates as the offline pass)."""
import itertools

import numpy as np
import pytest
import soundfile as sf
import torch

from shared.heads import RetrievalModel, Tower
from shared.top_layers import IdentityTop
from stage3_index.retriever import GlossaryIndex, Retriever, vote, windows

BANDS = np.array([300, 500, 800, 1200, 1800, 2500, 3300, 4500])


class BandBackbone:
    """Per 20 ms frame: energy near each of 8 frequencies (a toy 'acoustic' feature)."""

    def audio_features(self, waves):
        out = []
        for w in waves:
            n = len(w) // 320
            fr = w[: n * 320].reshape(n, 320) * np.hanning(320)
            spec = np.abs(np.fft.rfft(fr, axis=1))
            freqs = np.fft.rfftfreq(320, 1 / 16000)
            bands = np.stack([spec[:, np.abs(freqs - f) < 60].sum(1) for f in BANDS], 1)
            out.append(bands.astype(np.float32))
        return out


def make_retriever(threshold=0.8):
    audio = Tower(IdentityTop(), 8, 8)
    with torch.no_grad():
        audio.proj.weight.copy_(torch.eye(8))
        audio.proj.bias.zero_()
    model = RetrievalModel(audio, Tower(IdentityTop(), 8, 8)).eval()
    terms = [f"term{i}" for i in range(8)]
    entries = [{"term": t, "target_translations": {"de": t.upper()}} for t in terms]
    gloss = GlossaryIndex(terms, np.eye(8, dtype=np.float32), np.arange(8), entries)
    return Retriever(BandBackbone(), model, gloss, threshold)


def test_windows_cover_the_recording():
    spans = windows(16000 * 5, 1.92, 0.96)
    assert spans[0] == (0, 30720) and spans[-1][1] == 80000
    assert all(b[0] - a[0] == 15360 for a, b in zip(spans[:-2], spans[1:-1]))
    assert windows(1000, 1.92, 0.96) == [(0, 1000)]


def test_vote_groups_runs_and_needs_votes():
    spans = [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
    best = [(3, 0.9), (3, 0.95), (1, 0.5), (2, 0.85), (2, 0.99)]
    assert vote(spans, best, 0.8) == [(3, 0.95, 0, 3), (2, 0.99, 3, 6)]
    assert vote(spans, best, 0.8, min_votes=3) == []
    assert vote(spans, best, 0.97) == [(2, 0.99, 4, 6)]


def test_finds_the_term_at_the_right_time(tmp_path):
    sr = 16000
    rng = np.random.default_rng(0)
    wav = 0.003 * rng.standard_normal(sr * 8)
    t = np.arange(int(2.0 * sr)) / sr
    wav[2 * sr:4 * sr] += 0.3 * np.sin(2 * np.pi * BANDS[5] * t)     # term5 sounds from 2.0 s to 4.0 s
    path = tmp_path / "talk.wav"
    sf.write(path, wav.astype(np.float32), sr)
    hits = make_retriever().retrieve(path)
    assert [h["term"] for h in hits] == ["term5"]
    h = hits[0]
    assert h["score"] > 0.9
    assert 2.0 - 1.92 <= h["start"] <= 2.0 and 4.0 <= h["end"] <= 4.0 + 1.92
    # silence/noise alone is rejected
    sf.write(path, (0.003 * rng.standard_normal(sr * 4)).astype(np.float32), sr)
    assert make_retriever().retrieve(path) == []


def talk(seconds=8.0, seed=0):
    """Noise with term5 from 2.0 to 4.0 s and term2 (weaker) from 5.0 to 6.5 s."""
    sr = 16000
    rng = np.random.default_rng(seed)
    wav = 0.003 * rng.standard_normal(int(sr * seconds))
    for band, a, b, amp in ((5, 2.0, 4.0, 0.3), (2, 5.0, 6.5, 0.2)):
        if b <= seconds:
            t = np.arange(int((b - a) * sr)) / sr
            wav[int(a * sr):int(a * sr) + len(t)] += amp * np.sin(2 * np.pi * BANDS[band] * t)
    return wav.astype(np.float32)


def stream_through(stream, wav, sizes):
    """Every window `stream` gives for `wav` pushed in blocks of the given sizes (cycled), then flushed."""
    got, pos, sizes = [], 0, iter(sizes)
    while pos < len(wav):
        n = next(sizes)
        got += stream.push(wav[pos:pos + n])
        pos += n
    return got + stream.flush()


def same_windows(got, offline):
    """The same windows with the same candidates (terms in order, scores to float tolerance)."""
    assert [(w["start"], w["end"]) for w in got] == [(w["start"], w["end"]) for w in offline]
    for a, b in zip(got, offline):
        assert [c["term"] for c in a["candidates"]] == [c["term"] for c in b["candidates"]]
        np.testing.assert_allclose([c["score"] for c in a["candidates"]], [c["score"] for c in b["candidates"]],
                                   atol=2e-4)


def test_top_k_per_window_gives_candidates_over_threshold_with_translations():
    r = make_retriever(threshold=0.3)
    out = r.retrieve(talk(), top_k=3)
    assert [(w["start"], w["end"]) for w in out] == [(s / 16000, e / 16000) for s, e in windows(8 * 16000, 1.92, 0.96)]
    for w in out:
        scores = [c["score"] for c in w["candidates"]]
        assert len(scores) <= 3 and scores == sorted(scores, reverse=True) and all(s >= 0.3 for s in scores)
    during = [w for w in out if w["start"] >= 1.9 and w["end"] <= 4.1]   # [1.92, 3.84]
    assert during and all(w["candidates"][0]["term"] == "term5" for w in during)
    assert during[0]["candidates"][0]["translations"] == {"de": "TERM5"}
    assert any(w["candidates"] and w["candidates"][0]["term"] == "term2" for w in out if w["start"] >= 4.5)
    # noise alone ([0, 1.92], before term5 starts) scores below every window holding term5, so a threshold
    # between the two rejects it and keeps those windows' term5
    noise_top = max((c["score"] for w in out if w["end"] <= 2.0 for c in w["candidates"]), default=0.0)
    term_top = min(w["candidates"][0]["score"] for w in during)
    assert noise_top < term_top
    r.threshold = (noise_top + term_top) / 2
    again = r.retrieve(talk(), top_k=3)
    assert all(not w["candidates"] for w in again if w["end"] <= 2.0)
    assert all(w["candidates"][0]["term"] == "term5" for w in again if w["start"] >= 1.9 and w["end"] <= 4.1)


@pytest.mark.parametrize("seconds", [1.0, 1.92, 2.88, 8.0, 8.3])
@pytest.mark.parametrize("block", [320, 8000, "random"])
def test_stream_equals_offline(seconds, block):
    r = make_retriever(threshold=0.3)
    wav = talk(seconds, seed=1)
    offline = r.retrieve(wav, top_k=3)
    rng = np.random.default_rng(2)
    sizes = (int(rng.integers(1, 12000)) for _ in iter(int, 1)) if block == "random" else itertools.repeat(block)
    same_windows(stream_through(r.stream(top_k=3), wav, sizes), offline)
    # windows come out as soon as complete: after 2.0 s of audio the window [0, 1.92] is out
    s2 = r.stream(top_k=3)
    first = s2.push(wav[:32000]) if len(wav) >= 32000 else []
    assert len(first) == (1 if len(wav) >= 32000 else 0)
    assert len(s2.buf) <= int(1.92 * 16000) + 32000     # memory bounded by a window and a block


def test_stream_merge_matches_offline_merge():
    from stage3_index.retriever import merge_windows
    r = make_retriever()
    wav = talk()
    wins = stream_through(r.stream(top_k=1), wav, itertools.repeat(4000))
    assert merge_windows(wins) == r.retrieve(wav) and [h["term"] for h in r.retrieve(wav)][0] == "term5"


# ---------------------------------------------------------------- the transcript as evidence

class ScriptASR:
    """An ASR that says the same words for every window, and counts the windows it heard."""

    def __init__(self, text):
        self.text, self.heard = text, 0

    def transcribe(self, waves):
        self.heard += len(waves)
        return [self.text for _ in waves]


NATO = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def fused_retriever(text, weight=2.0, fused_threshold=0.3, threshold=0.3):
    """make_retriever's tone bands named by words that share few letters (term5 = foxtrot), with an ASR."""
    from stage3_index.cascade import CascadeMatcher
    from stage3_index.retriever import TranscriptEvidence
    r = make_retriever(threshold)
    r.glossary = GlossaryIndex(NATO, np.eye(8, dtype=np.float32), np.arange(8), [{"term": t} for t in NATO])
    asr = ScriptASR(text)
    r.evidence = TranscriptEvidence(asr, CascadeMatcher(*r.glossary.forms()), weight, fused_threshold)
    return r, asr


def test_a_transcript_naming_a_term_moves_it_up_and_audio_only_is_kept_beside():
    r, asr = fused_retriever("we deploy it with delta now", threshold=0.5)
    out = r.retrieve(talk(), top_k=3)
    assert asr.heard == len(out) and all(w["transcript"] == "we deploy it with delta now" for w in out)
    during = [w for w in out if w["start"] >= 1.9 and w["end"] <= 4.1]
    assert during
    for w in during:
        assert w["audio_candidates"][0]["term"] == "foxtrot"      # what the audio alone says
        assert w["candidates"][0]["term"] == "delta"              # the transcript names delta
        assert "foxtrot" in [c["term"] for c in w["candidates"]]
    # noise windows: the audio rejects, the transcript's delta passes the fused threshold
    quiet = [w for w in out if w["end"] < 2.0]
    assert quiet and all(not w["audio_candidates"] and w["candidates"][0]["term"] == "delta" for w in quiet)
    # weight 0: the transcript changes nothing
    r0, _ = fused_retriever("we deploy it with delta now", weight=0.0)
    for w in r0.retrieve(talk(), top_k=3):
        assert [c["term"] for c in w["candidates"]] == [c["term"] for c in w["audio_candidates"]]


def test_an_empty_transcript_leaves_the_audio_ranking():
    r, _ = fused_retriever("", weight=1.0)
    out = r.retrieve(talk(), top_k=3)
    assert any(w["candidates"] for w in out)
    for w in out:
        assert w["candidates"] == w["audio_candidates"]


def test_stream_with_the_transcript_equals_offline_and_batches_change_nothing():
    r, _ = fused_retriever("delta", weight=0.5, fused_threshold=0.6)
    wav = talk(8.3, seed=3)
    offline = r.retrieve(wav, top_k=3)
    for batch in (1, 4):
        got = stream_through(r.stream(top_k=3, batch=batch, with_id=True), wav, itertools.repeat(7000))
        same_windows(got, offline)
        for a, b in zip(got, offline):
            assert [c["term"] for c in a["audio_candidates"]] == [c["term"] for c in b["audio_candidates"]]
            assert all(NATO[c["id"]] == c["term"] == c["key"] for c in a["candidates"])


def second_stage_retriever(threshold=0.0):
    """make_retriever's glossary with a hand-built second stage: random matching of each term's 'phones'
    (its letters) to the window's band frames, all of the mix on the match: another order than the cosine's."""
    from shared import second_stage as ss
    r = make_retriever(threshold)
    phones = [f"t{'abcdefgh'[i]}{i}" for i in range(8)]
    vocab = ss.build_vocab({"phones": phones})
    torch.manual_seed(0)
    module = ss.build(ss.spec_of(8, vocab, 16, "monotonic", 16, 5)).eval()
    with torch.no_grad():
        module.mix.copy_(torch.tensor([0.0, 1.0]))
    rr = ss.Reranker(module, ss.spec_of(8, vocab, 16, "monotonic", 16, 5), {})
    r.reranker, r.token_table = rr, rr.token_table({"spell": phones, "phones": phones})
    return r


def test_the_second_stage_reorders_and_stream_equals_offline():
    r = second_stage_retriever()
    wav = talk(8.3, seed=1)
    offline = r.retrieve(wav, top_k=3)
    same_windows(stream_through(r.stream(top_k=3), wav, itertools.repeat(5000)), offline)
    # the candidates are the first stage's top_n (5 of 8) re-ordered by the fused score, not the cosine order
    first = make_retriever(0.0).retrieve(wav, top_k=3)
    assert [[c["term"] for c in w["candidates"]] for w in offline] != \
        [[c["term"] for c in w["candidates"]] for w in first]
    vecs, items = r._window_taps([wav[:30720]])
    cos = (vecs @ r.glossary.vectors.T)[0]
    top5 = set(np.argsort(-cos)[:5].tolist())
    ids, scores = r.rank(vecs, items, 5)
    assert set(ids[0].tolist()) == top5 and np.all(np.diff(scores[0]) <= 1e-6)


def test_without_the_second_stage_it_is_the_first_stage():
    r = second_stage_retriever(threshold=0.3)
    r.reranker = r.token_table = None          # what Retriever.load(second=False) or a run without second.pt gives
    wav = talk(8.0, seed=1)
    assert r.retrieve(wav, top_k=3) == make_retriever(0.3).retrieve(wav, top_k=3)
