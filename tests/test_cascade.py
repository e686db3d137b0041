"""The cascade baseline: fuzzy term ranking on transcripts (pure) and the cached transcription step."""
import json

import numpy as np
import pytest

from shared.audio import write_wav
from shared.config import load_config
from shared.errors import BadInput
from shared.manifest import Chunk, write_chunks
from stage3_index.cascade import SCORERS, CascadeMatcher, rank_all, rank_terms, term_forms

KEYS = ["ai", "dock", "docker", "kubernetes", "machine learning", "playstation"]   # ids 0..5 (sorted)
TEXTS = ["AI", "Dock", "Docker", "Kubernetes", "Machine Learning", "PlayStation"]
ALIASES = {"k8s": "kubernetes", "ML": "Machine Learning", "ghost": "not in the glossary"}


@pytest.fixture
def gloss():
    return term_forms(KEYS, ALIASES, TEXTS)


def test_term_forms_normalises_dedups_and_maps_aliases(gloss):
    forms, owner = gloss
    assert list(zip(forms, owner)) == [("ai", 0), ("dock", 1), ("docker", 2), ("k8s", 3), ("kubernetes", 3),
                                       ("machine learning", 4), ("ml", 4), ("playstation", 5)]


def test_exact_words_score_one_and_near_duplicates_rank_below(gloss):
    ids, scores = rank_terms("We deploy Docker, on Kubernetes.", *gloss, k=4, scorer="words")
    # docker and kubernetes both exact (1.0): tie broken by id; dock is "docker" minus 2 letters
    assert ids[:3].tolist() == [2, 3, 1]
    assert scores[:2].tolist() == [1.0, 1.0]
    assert scores[2] == pytest.approx(1 - 2 / 6)
    ids, scores = rank_terms("the dock was empty", *gloss, k=2, scorer="words")
    assert ids.tolist() == [1, 2] and scores[0] == 1.0 and scores[1] == pytest.approx(1 - 2 / 6)


def test_aliases_multiword_and_split_words(gloss):
    ids, scores = rank_terms("we use ml daily", *gloss, k=1, scorer="words")
    assert ids.tolist() == [4] and scores[0] == 1.0
    ids, scores = rank_terms("then machine learnin was", *gloss, k=1, scorer="words")
    assert ids.tolist() == [4] and scores[0] == pytest.approx(1 - 1 / 16)
    # a one-word term spoken as two words: compared with the 2-word n-gram
    ids, scores = rank_terms("buy a play station now", *gloss, k=1, scorer="words")
    assert ids.tolist() == [5] and scores[0] == pytest.approx(1 - 1 / 12)


def test_padding_and_empty_transcripts(gloss):
    ids, scores = rank_terms("docker", *gloss, k=10)
    assert ids.shape == (10,) and ids.dtype == np.int64 and scores.dtype == np.float32
    found = ids[ids >= 0]
    assert len(found) <= len(KEYS) and len(set(found.tolist())) == len(found)   # distinct terms
    assert (ids[len(found):] == -1).all() and (scores[len(found):] == 0).all()
    assert (np.diff(scores[:len(found)]) <= 0).all()
    for empty in ("", "   ", "...", "?!"):
        ids, scores = rank_terms(empty, *gloss, k=5)
        assert (ids == -1).all() and (scores == 0).all()


def test_rank_all_matches_rank_terms_and_is_deterministic(gloss):
    texts = ["docker and dock", "", "kubernetes k8s", "machine learning on a playstation", "ay eye"]
    ids, scores = rank_all(texts, *gloss, k=3)
    assert ids.shape == (5, 3) and scores.shape == (5, 3)
    for i, t in enumerate(texts):
        one_ids, one_scores = rank_terms(t, *gloss, k=3)
        assert ids[i].tolist() == one_ids.tolist() and np.array_equal(scores[i], one_scores)
    again = rank_all(texts, *gloss, k=3, matcher=CascadeMatcher(*gloss))
    assert np.array_equal(ids, again[0]) and np.array_equal(scores, again[1])
    # the rejection score of the no-term-like transcript is below that of an exact hit
    assert scores[4, 0] < scores[0, 0] == 1.0


# ---------------------------------------------------------------- transcription (stage 1)


@pytest.fixture
def chunk_setup(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 6) / 16000
    wav = (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
           + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    audio = tmp_path / "a.wav"
    write_wav(audio, wav)
    chunks = [Chunk(id=f"c{i}", audio=str(audio), audio_offset=1.5 * i, audio_duration=1.2 + 0.3 * i,
                    term_chunk_text="docker", term_chunk_audio_ground_truth_terms=["docker"], split="test")
              for i in range(3)]
    write_chunks(chunks, tmp_path / "chunks" / "test.jsonl")
    cfg = load_config(None, [f"data.chunks={tmp_path / 'chunks'}", f"cache.root={tmp_path / 'cache'}"])
    return cfg, tmp_path / "out", chunks


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


class FakeASR:
    """Counts the chunks it transcribes; can fail on its n-th call (a killed run)."""

    def __init__(self, fail_on_call=None, tag="fake"):
        self.calls, self.fail_on_call, self.tag = [], fail_on_call, tag

    def fingerprint(self):
        return {"asr": self.tag}

    def transcribe(self, waves):
        self.calls.append(len(waves))
        if self.fail_on_call == len(self.calls):
            raise KeyboardInterrupt
        return [f"{self.tag} {len(w)}" for w in waves]


def test_transcribe_with_the_packaged_whisper_caches_and_reuses(chunk_setup, monkeypatch):
    from stage1_extract import transcribe as tr
    cfg, out, chunks = chunk_setup
    logs = []
    stats = tr.transcribe(cfg, out=out, log=logs.append)
    folder = out / "transcripts"
    assert stats["chunks"] == 3
    lines = _lines(folder / "test.jsonl")
    assert [r["id"] for r in lines] == ["c0", "c1", "c2"] and all(isinstance(r["text"], str) for r in lines)
    head = json.loads((folder / "test.json").read_text())
    assert head["fingerprint"]["files_sha256"]["model.bin"] and head["fingerprint"]["compute_type"] == "int8"
    assert not (folder / ".test.parts").exists()
    assert tr.load_transcripts(folder, "test") == {r["id"]: r["text"] for r in lines}

    # a second run loads no model
    def no_model(cfg):
        raise AssertionError("the model was loaded for a complete split")
    monkeypatch.setattr(tr, "load_asr", no_model)
    logs.clear()
    stats = tr.transcribe(cfg, out=out, log=logs.append)
    assert stats["reused"] == ["test"] and "complete" in logs[-1]

    # a changed manifest is never served from the old transcripts: they are recomputed
    write_chunks(chunks[:2], cfg.data.chunks + "/test.jsonl")
    with pytest.raises(AssertionError, match="model was loaded"):
        tr.transcribe(cfg, out=out, log=logs.append)
    assert any("manifest_sha256" in x for x in logs)
    monkeypatch.undo()
    tr.transcribe(cfg, out=out, log=logs.append)
    assert [r["id"] for r in _lines(folder / "test.jsonl")] == ["c0", "c1"]


def test_transcribe_resumes_by_shard_and_never_mixes_models(chunk_setup, monkeypatch):
    from stage1_extract import transcribe as tr
    cfg, out, _ = chunk_setup
    monkeypatch.setattr(tr, "SHARD", 2)           # 3 chunks = 2 shards
    killed = FakeASR(fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        tr.transcribe(cfg, out=out, asr=killed, log=lambda *_: None)
    parts = out / "transcripts" / ".test.parts"
    assert (parts / "00000.jsonl").is_file() and not (parts / "00001.jsonl").exists()
    assert not (out / "transcripts" / "test.json").exists()      # not done: no header
    resumed = FakeASR()
    tr.transcribe(cfg, out=out, asr=resumed, log=lambda *_: None)
    assert resumed.calls == [1]                                 # only the missing shard
    assert [r["id"] for r in _lines(out / "transcripts" / "test.jsonl")] == ["c0", "c1", "c2"]
    # another model's leftover parts are discarded, not joined with ours
    other = FakeASR(fail_on_call=2, tag="other")
    (out / "transcripts" / "test.json").unlink()
    with pytest.raises(KeyboardInterrupt):
        tr.transcribe(cfg, out=out, asr=other, log=lambda *_: None)
    again = FakeASR(tag="again")
    tr.transcribe(cfg, out=out, asr=again, log=lambda *_: None)
    assert again.calls == [2, 1]
    assert all(r["text"].startswith("again") for r in _lines(out / "transcripts" / "test.jsonl"))


def test_transcribe_bad_audio_and_unknown_split(chunk_setup):
    from stage1_extract import transcribe as tr
    cfg, out, chunks = chunk_setup
    with pytest.raises(BadInput, match="no manifest for split 'dev'"):
        tr.transcribe(cfg, out=out, splits=["dev"], asr=FakeASR())
    chunks[1].audio_offset = 99.0                               # outside the 6 s file
    write_chunks(chunks, cfg.data.chunks + "/test.jsonl")
    with pytest.raises(BadInput, match="outside the audio"):
        tr.transcribe(cfg, out=out, asr=FakeASR(), log=lambda *_: None)
    stats = tr.transcribe(cfg, out=out, asr=FakeASR(), skip_bad=True, log=lambda *_: None)
    lines = _lines(out / "transcripts" / "test.jsonl")
    assert stats["rejected"] == 1 and [r["id"] for r in lines] == ["c0", "c1", "c2"]
    assert lines[1] == {"id": "c1", "text": "", "rejected": True}


def test_transcribe_with_a_tiny_qwen2audio(chunk_setup):
    import torch
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    from stage1_extract import transcribe as tr
    from tests.tiny import tiny_bpe_tokenizer, tiny_qwen2audio_model
    torch.set_num_threads(1)
    cfg, out, _ = chunk_setup
    tok = tiny_bpe_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|en|>"]})
    model = tiny_qwen2audio_model(layers=1)
    model.config.audio_token_id = tok.convert_tokens_to_ids("<|AUDIO|>")
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok)
    asr = tr.Qwen2AudioASR(model, processor, name="tiny")
    assert asr.prompt == tr.QWEN_BASE_PROMPT
    stats = tr.transcribe(cfg, out=out, asr=asr, log=lambda *_: None)
    assert stats["chunks"] == 3
    lines = _lines(out / "transcripts" / "test.jsonl")
    assert [r["id"] for r in lines] == ["c0", "c1", "c2"] and all(isinstance(r["text"], str) for r in lines)
    assert json.loads((out / "transcripts" / "test.json").read_text())["fingerprint"]["model"] == "tiny"

    def boom(waves):
        raise AssertionError("transcribed again")
    asr.transcribe = boom
    assert tr.transcribe(cfg, out=out, asr=asr, log=lambda *_: None)["reused"] == ["test"]


# ---------------------------------------------------------------- scorers


@pytest.mark.parametrize("scorer", SCORERS)
def test_every_scorer_puts_the_said_term_first_and_scores_within_0_1(gloss, scorer):
    for said, term in [("We deploy Kubernetes today", 3), ("a new playstation", 5), ("then machine learning", 4),
                       ("we use k8s", 3)]:
        ids, scores = rank_terms(said, *gloss, k=3, scorer=scorer)
        assert ids[0] == term, (scorer, said, ids)
        assert 0 < scores[0] <= 1 and (scores[1:] <= scores[0]).all()
    ids, scores = rank_terms("", *gloss, k=3, scorer=scorer)
    assert (ids == -1).all() and (scores == 0).all()


def test_scorers_differ_where_they_should(gloss):
    # phonemes hear a misspelt term that spelling barely matches
    said = "the cooper nettis cluster"
    by = {s: CascadeMatcher(*gloss, scorer=s).term_scores(said) for s in SCORERS}
    assert rank_terms(said, *gloss, k=1, scorer="phones")[0][0] == 3
    assert by["phones"][3] > by["words"][3] + 0.15
    assert by["words+phones"][3] == pytest.approx((by["words"][3] + by["phones"][3]) / 2)
    # partial_ratio ignores word boundaries: "ai" inside "said" is a perfect match, not so for "words"
    said = {s: CascadeMatcher(*gloss, scorer=s).term_scores("she said so") for s in SCORERS}
    assert said["partial"][0] == 1.0 and said["words"][0] < 0.6
    assert rank_terms("theplaystationnow", *gloss, k=1, scorer="partial")[1][0] == 1.0
    with pytest.raises(ValueError, match="unknown cascade scorer"):
        CascadeMatcher(*gloss, scorer="soundex")


# ---------------------------------------------------------------- Whisper's decoding modes


@pytest.fixture(scope="module")
def whisper():
    from stage1_extract import transcribe as tr
    return tr.WhisperCT2(tr._whisper_dir(), threads=1)


def test_window30_pads_every_chunk_to_3000_frames_fast_to_the_batch(whisper):
    from stage1_extract.transcribe import WHISPER_MODES
    assert whisper.mode == "window30"                          # the default
    waves = [np.zeros(int(1.2 * 16000), np.float32), np.full(int(2.5 * 16000), 0.01, np.float32)]
    mel, cap = whisper.mel(waves)
    assert mel.shape == (2, 80, 3000) and mel.dtype == np.float32 and mel.flags.c_contiguous
    assert cap == 8 + 20                                       # 8 tokens per second of the longest chunk's 2.5 s + 8
    whisper.decoding = WHISPER_MODES["fast"]
    try:
        mel, cap = whisper.mel(waves)
        assert mel.shape == (2, 80, 350)                       # (2.5 s + 1 s) * 100 frames a second
        assert cap == 4 + 28
        # a batch never pads past the window
        assert whisper.mel([np.zeros(int(29.5 * 16000), np.float32)])[0].shape[-1] == 3000
    finally:
        whisper.decoding = WHISPER_MODES["window30"]


def test_long_audio_is_cut_into_window_pieces_and_joined(whisper):
    from stage1_extract.transcribe import window_pieces
    pieces, owner = window_pieces([np.arange(65, dtype=np.float32), np.zeros(0, np.float32), np.ones(30)], size=30)
    assert [len(p) for p in pieces] == [30, 30, 5, 0, 30] and owner == [0, 0, 0, 1, 2]
    assert np.array_equal(np.concatenate(pieces[:3]), np.arange(65))

    asr = whisper
    word = asr.tokenizer.encode(" hello", add_special_tokens=False).ids

    class Result:
        sequences_ids = [word]

    class Stub:
        """Says 'hello' for every window it is given, and records the windows' shapes."""
        shapes = []

        def generate(self, features, prompts, beam_size, max_length):
            self.shapes.append((tuple(features.shape), max_length))
            return [Result() for _ in prompts]

    real, asr.model = asr.model, Stub()
    try:
        texts = asr.transcribe([np.zeros(65 * 16000, np.float32), np.zeros(16000, np.float32)])
    finally:
        asr.model = real
    assert texts == ["hello hello hello", "hello"]
    assert sum(s[0] for s, _ in Stub.shapes) == 4 and all(s[2] == 3000 for s, _ in Stub.shapes)


def test_the_mode_is_in_the_fingerprint_and_a_bad_one_is_refused(chunk_setup):
    from stage1_extract import transcribe as tr
    cfg, _, _ = chunk_setup
    fp = tr.asr_fingerprint(cfg)
    assert fp["decoding"]["mode"] == "window30" == cfg.extract.asr_mode
    fast = tr.asr_fingerprint(load_config(None, [f"data.chunks={cfg.data.chunks}", "extract.asr_mode=fast"]))
    assert fast["decoding"]["mode"] == "fast" and fast["files_sha256"] == fp["files_sha256"]
    with pytest.raises(BadInput, match="asr_mode 'slow'"):
        tr.asr_fingerprint(load_config(None, ["extract.asr_mode=slow"]))


def test_load_asr_follows_the_cached_transcripts_mode(tmp_path, monkeypatch):
    from stage1_extract import transcribe as tr
    made = []
    monkeypatch.setattr(tr, "WhisperCT2", lambda d, mode, threads: made.append(mode) or mode)
    cfg = load_config(None, ["extract.asr_mode=window30"])
    assert tr.load_asr(cfg) == "window30" and tr.load_asr(cfg, tmp_path) == "window30"     # no transcripts
    (tmp_path / "transcripts").mkdir()
    (tmp_path / "transcripts/dev.json").write_text(json.dumps({"fingerprint": {"decoding": {"mode": "fast"}}}))
    (tmp_path / "transcripts/test.json").write_text(json.dumps({"fingerprint": {"decoding": {"mode": "window30"}}}))
    assert tr.load_asr(cfg, tmp_path) == "fast"                # dev's, where the fusion weight was picked
    assert tr.load_asr(cfg, tmp_path, mode="window30") == "window30"
    # transcripts made before the modes existed: padded to batch longest + 1 s
    (tmp_path / "transcripts/dev.json").write_text(json.dumps({"fingerprint": {"decoding": {"pad_seconds": 1.0}}}))
    assert tr.load_asr(cfg, tmp_path) == "fast"


# ---------------------------------------------------------------- a fixed subset of chunks


def test_every_kth_chunk_is_a_fixed_subset_and_changing_k_recomputes(chunk_setup):
    from stage1_extract import transcribe as tr
    cfg, out, chunks = chunk_setup
    ids = [f"c{i}" for i in range(10)]
    assert tr.select_chunks(ids, every=3) == ["c0", "c3", "c6", "c9"] == tr.select_chunks(list(ids), every=3)
    assert tr.select_chunks(ids, limit=5, every=2) == ["c0", "c2", "c4"]
    with pytest.raises(BadInput, match="asr_every"):
        tr.select_chunks(ids, every=0)
    cfg.extract.asr_every = 2
    tr.transcribe(cfg, out=out, asr=FakeASR(), log=lambda *_: None)
    folder = out / "transcripts"
    assert [r["id"] for r in _lines(folder / "test.jsonl")] == ["c0", "c2"]
    assert json.loads((folder / "test.json").read_text())["every"] == 2
    cfg.extract.asr_every = 1
    again = FakeASR()
    tr.transcribe(cfg, out=out, asr=again, log=lambda *_: None)
    assert again.calls == [3] and [r["id"] for r in _lines(folder / "test.jsonl")] == ["c0", "c1", "c2"]


def test_eval_scores_the_cascade_and_ours_on_the_same_subset(tmp_path, monkeypatch):
    """Transcripts of every 2nd test chunk: the cascade and 'ours on the cascade's chunks' are both taken on
    chunks 0, 2, 4, 6 of tests/test_eval_known.py's hand-placed cache, whose every score is known."""
    import stage3_index.evaluate as ev
    from tests import test_eval_known as known
    model = known.identity_model()
    monkeypatch.setattr(ev, "load_model", lambda ckpt, features=None: (model, ckpt))
    monkeypatch.setattr(ev, "embed_glossary", lambda m, cache: known.VECS[str(cache.root)][:2])
    monkeypatch.setattr(ev, "embed_text_table", lambda m, cache, name: known.VECS[str(cache.root)][2])
    cache = known.build(tmp_path / "own", known.KEYS, {"train": known.TRAIN, "dev": known.DEV, "test": known.TEST},
                        dist_texts=known.DIST_TEXTS, dist=known.DIST)
    run = known.make_run(tmp_path / "own", cache)
    folder = cache.root / "transcripts"
    folder.mkdir()
    kept = [0, 2, 4, 6]
    (folder / "test.jsonl").write_text("".join(json.dumps({"id": f"test{i}", "text": known.TRANSCRIPTS[i]}) + "\n"
                                               for i in kept))
    (folder / "test.json").write_text(json.dumps({"every": 2, "fingerprint": {"decoding": {
        "mode": "window30", "pad": "each chunk to the 30 s window"}}}))
    rep = ev.evaluate(run, log=lambda *_: None)
    b = rep["baseline"]
    assert b["asr"] == {"mode": "window30", "pad": "each chunk to the 30 s window", "every": 2, "chunks": 4,
                        "split_chunks": 8}
    # queries of chunks 0, 2, 4 (6 says nothing: no term): c0 alpha, c2 bravo, c4 echo
    assert b["queries"] == 3
    # ours there: c0 hit@1, c2 bravo 2nd behind delta, c4 echo hit@1 (on all 8 chunks: 5/7)
    assert b["ours_same_chunks"]["recall"] == pytest.approx({"1": 2 / 3, "2": 1.0, "3": 1.0})
    assert rep["recall"]["1"] == pytest.approx(5 / 7)
    # the cascade there: "we saw alpha today" and "bravo" name their term, c4 says "foxtrot" (not echo)
    assert b["recall"]["1"] == pytest.approx(2 / 3)
    md = (run / "eval/test/report.md").read_text()
    assert "| ours on the cascade's chunks: all | 0.667 | 1.000 | 1.000 | 3 |" in md
    assert "one chunk in 2 only (4 of 8)" in md and "Whisper decoding window30" in md
