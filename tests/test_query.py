"""`query` as a translator uses it: a run loaded from anywhere with a talk glossary it never saw (embedded
like stage 1 would, cached beside the run), windows of a WAV or of raw PCM on stdin, and bad input."""
import json

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from shared.cache import FeatureCache
from shared.errors import BadInput
from shared.glossary import load_glossary
from shared.heads import load_model
from shared.termside import embed_glossary
from stage2_train.train import train
from stage3_index import retriever as R
from tests.synthetic import AUDIO_DIM, build_cache
from tests.test_train import cfg_for


class FrameBackbone:
    """50 Hz frames of AUDIO_DIM band energies: what the synthetic cache's audio top reads."""
    text_calls = 0

    def audio_features(self, waves):
        out = []
        for w in waves:
            n = max(1, len(w) // 320)
            fr = np.pad(w, (0, n * 320 - len(w) if len(w) < n * 320 else 0))[: n * 320].reshape(n, 320)
            spec = np.abs(np.fft.rfft(fr, axis=1))[:, 1:1 + 16 * AUDIO_DIM]
            out.append(np.log1p(spec.reshape(n, AUDIO_DIM, -1).sum(-1)).astype(np.float32))
        return out


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("queryrun")
    features = build_cache(root, n_terms=30, n_train=96, n_dev=24, n_test=24)
    cfg = cfg_for(**{"train.epochs": 1, "text.encoders": "chars,phones"})
    train(cfg, features, root / "run", log=quiet)
    return root / "run"


@pytest.fixture
def talk_glossary(tmp_path):
    g = {"kubernetes": {"term": "Kubernetes", "short_description": "container orchestration",
                        "target_translations": {"de": "Kubernetes", "zh": "库伯内特斯"}},
         "playstation": {"term": "PlayStation", "target_translations": {"de": "PlayStation"}},
         "docker": {"term": "Docker"}}
    p = tmp_path / "talk.json"
    p.write_text(json.dumps(g, ensure_ascii=False))
    a = tmp_path / "alt2main.json"
    a.write_text(json.dumps({"k8s": "Kubernetes"}))
    return p, a


def test_a_glossary_file_embeds_exactly_like_the_cached_one(run):
    """The talk-glossary path (forms computed now) gives the vectors stage 1 + stage 2 give for the same
    glossary: the talk's terms are embedded the way the run's were."""
    model, ckpt = load_model(run / "best.pt")
    cache = FeatureCache(ckpt["spec"]["features"])
    want, owner = embed_glossary(model, cache)
    gloss = load_glossary(cache.root.parent / "corpus" / "glossary.json", log=None)
    got, got_owner = R.embed_glossary_file(model, gloss, "term", "espeak", log=None)
    np.testing.assert_array_equal(got_owner, owner)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_talk_glossary_rows_aliases_cache_and_candidates(run, talk_glossary, monkeypatch):
    g, a = talk_glossary
    calls = []
    real = R.embed_glossary_file
    monkeypatch.setattr(R, "embed_glossary_file", lambda *x, **k: calls.append(1) or real(*x, **k))
    r = R.Retriever.load(run, glossary=g, alt2main=a, backbone=FrameBackbone(), threshold=-1.0, log=quiet)
    assert r.glossary.terms == ["Docker", "Kubernetes", "PlayStation"]        # sorted keys' display forms
    assert r.glossary.owner.tolist() == [0, 1, 2, 1]                          # + the alias row k8s
    assert len(calls) == 1 and list((run / "glossaries").glob("*.npz"))
    again = R.Retriever.load(run, glossary=g, alt2main=a, backbone=FrameBackbone(), threshold=-1.0, log=quiet)
    assert len(calls) == 1                                                    # second load: from the cache
    np.testing.assert_array_equal(again.glossary.vectors, r.glossary.vectors)
    # another glossary (or alias map) is another cache entry
    R.Retriever.load(run, glossary=g, backbone=FrameBackbone(), threshold=-1.0, log=quiet)
    assert len(calls) == 2
    wav = (0.1 * np.random.default_rng(0).standard_normal(16000 * 4)).astype(np.float32)
    every = r.retrieve(wav, top_k=3)                   # threshold -1: every term in every window, best first
    assert len(every) == 4
    own = {"Kubernetes": ({"de": "Kubernetes", "zh": "库伯内特斯"}, "container orchestration"),
           "PlayStation": ({"de": "PlayStation"}, None), "Docker": (None, None)}
    for w in every:
        assert sorted(c["term"] for c in w["candidates"]) == ["Docker", "Kubernetes", "PlayStation"]
        assert [c["score"] for c in w["candidates"]] == sorted((c["score"] for c in w["candidates"]), reverse=True)
        for c in w["candidates"]:                      # its own entry's translations and description, no other's
            assert (c.get("translations"), c.get("description")) == own[c["term"]], c
    assert [w["candidates"] for w in r.retrieve(wav, top_k=2)] == [w["candidates"][:2] for w in every]
    # a threshold between two of the scores keeps exactly the candidates that reach it, in the same order
    scores = sorted({c["score"] for w in every for c in w["candidates"]})
    m = len(scores) // 2
    r.threshold = (scores[m - 1] + scores[m]) / 2      # scores are rounded to 4 places: not on one of them
    kept = r.retrieve(wav, top_k=3)
    assert [w["candidates"] for w in kept] == \
        [[c for c in w["candidates"] if c["score"] > r.threshold] for w in every]
    assert 0 < sum(map(len, (w["candidates"] for w in kept))) < 12


def test_query_command_reads_pcm_from_stdin_and_a_resampled_wav(run, talk_glossary, tmp_path, monkeypatch):
    import stage1_extract.backbones as bb
    monkeypatch.setattr(bb, "load_backbone", lambda spec: FrameBackbone())
    monkeypatch.chdir(tmp_path)                      # works from any directory
    g, a = talk_glossary
    rng = np.random.default_rng(1)
    wav = (0.2 * rng.standard_normal(int(16000 * 3.5))).astype(np.float32)
    pcm = (wav * 32767).astype("<i2").tobytes()
    res = CliRunner().invoke(R.query_command, ["--run", str(run), "--audio", "-", "--glossary", str(g),
                                               "--alt2main", str(a), "--top-k", "2", "--threshold", "-1",
                                               "--block-ms", "20"], input=pcm)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [(w["start"], w["end"]) for w in lines] == [(0.0, 1.92), (0.96, 2.88), (1.58, 3.5)]
    assert all(len(w["candidates"]) == 2 for w in lines)
    # --threshold reaches the search: no cosine reaches 1.01, so every window is empty
    res = CliRunner().invoke(R.query_command, ["--run", str(run), "--audio", "-", "--glossary", str(g),
                                               "--top-k", "2", "--threshold", "1.01"], input=pcm)
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["candidates"] for x in res.stdout.splitlines() if x.startswith("{")] == [[], [], []]
    # the same audio as a 44.1 kHz stereo file: converted, and said so
    import soxr
    path = tmp_path / "talk.wav"
    sf.write(path, np.stack([soxr.resample(wav, 16000, 44100)] * 2, 1), 44100)
    res = CliRunner().invoke(R.query_command, ["--run", str(run), "--audio", str(path), "--glossary", str(g),
                                               "--top-k", "1", "--threshold", "-1"])
    assert res.exit_code == 0, res.output
    assert "44100 Hz, 2 channel(s): mixed down to mono and resampled" in res.stderr
    assert len([x for x in res.stdout.splitlines() if x.startswith("{")]) == 3


def test_bad_run_folder_and_bad_glossary_are_named(run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no checkpoint.*train it first"):
        R.Retriever.load(tmp_path / "empty", backbone=FrameBackbone())
    with pytest.raises(BadInput, match="run folder does not exist"):
        R.Retriever.load(tmp_path / "nope", backbone=FrameBackbone())
    bad = tmp_path / "g.json"
    bad.write_text("[1, 2]")
    with pytest.raises(BadInput, match="g.json.*item 0 is neither a string"):
        R.Retriever.load(run, glossary=bad, backbone=FrameBackbone(), threshold=0.0, log=quiet)
    res = CliRunner().invoke(R.query_command, ["--run", str(tmp_path / "empty"), "--audio", "x.wav"])
    assert res.exit_code != 0 and "no checkpoint" in str(res.exception or res.output)


class EchoASR:
    """Says the same words for every window."""

    def __init__(self, text=""):
        self.text = text

    def transcribe(self, waves):
        return [self.text] * len(waves)


def _write_transcripts(cache, split, text_of):
    from shared.manifest import read_chunks
    chunks = read_chunks(cache.root.parent / "corpus" / f"{split}.jsonl")
    (cache.root / "transcripts").mkdir(exist_ok=True)
    (cache.root / "transcripts" / f"{split}.jsonl").write_text(
        "".join(json.dumps({"id": c.id, "text": text_of(c)}) + "\n" for c in chunks))


def test_the_transcript_weight_and_thresholds_are_picked_on_dev_as_eval_picks_them(run):
    """No dev transcripts: audio only, said. Dev transcripts that name the terms: a weight > 0 (the one eval
    reports for "ours + transcript"), a fused threshold, and the cascade's threshold 1.0 (every right top-1 is
    an exact match); transcripts that say nothing: weight 0 (ties go to the smaller)."""
    from stage3_index.evaluate import evaluate
    _, ckpt = load_model(run / "best.pt")
    cache = FeatureCache(ckpt["spec"]["features"])
    said = []
    r = R.Retriever.load(run, backbone=FrameBackbone(), asr=EchoASR(), log=said.append)
    assert r.evidence is None and any("no transcripts" in m for m in said)
    _write_transcripts(cache, "dev", lambda c: c.term_chunk_text)
    r = R.Retriever.load(run, backbone=FrameBackbone(), asr=EchoASR("term003"), log=quiet)
    ev = r.evidence
    assert ev is not None and ev.weight > 0 and ev.picked["cascade_threshold"] == 1.0
    assert np.isfinite(ev.threshold) and (run / R.PICKS_FILE).is_file()
    out = r.retrieve((0.1 * np.random.default_rng(0).standard_normal(16000 * 3)).astype(np.float32), top_k=3)
    assert all(w["transcript"] == "term003" and "audio_candidates" in w for w in out)
    _write_transcripts(cache, "test", lambda c: c.term_chunk_text)
    rep = evaluate(run, "test", log=quiet)
    assert rep["fused"]["weight"] == ev.weight
    _write_transcripts(cache, "dev", lambda c: "")
    r = R.Retriever.load(run, backbone=FrameBackbone(), asr=EchoASR(), log=quiet)
    assert r.evidence.weight == 0.0 and r.evidence.picked["cascade_threshold"] is None


def test_query_transcript_flag_gives_fused_and_audio_only_candidates(run, monkeypatch, tmp_path):
    import stage1_extract.backbones as bb
    _, ckpt = load_model(run / "best.pt")
    cache = FeatureCache(ckpt["spec"]["features"])
    _write_transcripts(cache, "dev", lambda c: c.term_chunk_text)
    monkeypatch.setattr(bb, "load_backbone", lambda spec: FrameBackbone())
    monkeypatch.setattr(R, "backbone_asr", lambda *a, **k: EchoASR("term005"))
    wav = (0.2 * np.random.default_rng(1).standard_normal(int(16000 * 3.5))).astype(np.float32)
    sf.write(tmp_path / "talk.wav", wav, 16000)
    res = CliRunner().invoke(R.query_command, ["--run", str(run), "--audio", str(tmp_path / "talk.wav"),
                                               "--transcript", "--threshold", "-5", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 3 and all(w["transcript"] == "term005" for w in lines)
    # --threshold applies to the fused score; the audio-only candidates are the plain query's (own threshold)
    assert all(len(w["candidates"]) == 2 and "term005" in [c["term"] for c in w["candidates"]] for w in lines)
    assert "transcript weight" in res.stderr
    plain = CliRunner().invoke(R.query_command, ["--run", str(run), "--audio", str(tmp_path / "talk.wav"),
                                                 "--top-k", "2"])
    plain = [json.loads(x) for x in plain.stdout.splitlines() if x.startswith("{")]
    assert [w["audio_candidates"] for w in lines] == [w["candidates"] for w in plain]
    assert all("transcript" not in w for w in plain)
