"""A small synthetic feature cache with learnable signal, for stage 2 and 3 tests.

Each term has a random "acoustic" prototype; a chunk's frames are its terms' prototypes plus
noise; a term's text feature is a fixed random projection of the same prototype plus noise.
The exported tops are a real 1-layer Qwen2-Audio encoder top (audio, 50 Hz -> 25 Hz pooling)
and the identity (text), written with the same save_top the backbones use.
"""
import json
from pathlib import Path

import numpy as np
import torch

from shared.cache import FeatureCache, TablePlan, file_sha256
from shared.manifest import Chunk, read_chunks, write_chunks
from shared.termside import write_forms
from shared.top_layers import save_top

AUDIO_DIM, TEXT_DIM = 16, 12


def build_cache(root: Path, n_terms=40, n_train=160, n_dev=40, n_test=40, audio_top=True, seed=0,
                noterm_share=0.1) -> Path:
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((n_terms, AUDIO_DIM)).astype(np.float32)
    mix = rng.standard_normal((AUDIO_DIM, TEXT_DIM)).astype(np.float32) / 4
    keys = [f"term{i:03d}" for i in range(n_terms)]
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "glossary.json").write_text(json.dumps(keys))
    manifests, tables, items = {}, {}, {}
    unseen = set(range(n_terms - 8, n_terms))           # terms only in dev/test
    for split, n in [("train", n_train), ("dev", n_dev), ("test", n_test)]:
        chunks, feats = [], []
        for i in range(n):
            noterm = rng.random() < noterm_share
            pool = [t for t in range(n_terms) if (t not in unseen or split != "train")]
            terms = [] if noterm else sorted(set(rng.choice(pool, size=1 + (rng.random() < 0.2), replace=False).tolist()))
            T = int(rng.integers(20, 60))
            x = 0.8 * rng.standard_normal((T, AUDIO_DIM)).astype(np.float32)
            for t in terms:
                x += protos[t]
            feats.append(x)
            chunks.append(Chunk(id=f"{split}{i}", audio="/none.wav", audio_offset=0.0, audio_duration=T / 50,
                                term_chunk_text=" ".join(keys[t] for t in terms) or f"filler {i % 7}",
                                term_chunk_audio_ground_truth_terms=[keys[t] for t in terms],
                                is_no_term_chunk=noterm, split=split))
        manifests[split] = corpus / f"{split}.jsonl"
        write_chunks(chunks, manifests[split])
        tables[f"audio/{split}"] = TablePlan(n, 64)
        items[f"audio/{split}"] = ([c.id for c in chunks], feats)
    texts = sorted({c.term_chunk_text for s in manifests for c in read_chunks(manifests[s])})
    gl_feats = [(protos[t] @ mix + 0.05 * rng.standard_normal(TEXT_DIM)).astype(np.float32)[None].repeat(3, 0)
                for t in range(n_terms)]
    tx_feats = [rng.standard_normal((4, TEXT_DIM)).astype(np.float32) for _ in texts]
    tables["text/glossary"] = TablePlan(n_terms, 256)
    tables["text/chunks"] = TablePlan(len(texts), 256)
    items["text/glossary"] = ([str(i) for i in range(n_terms)], gl_feats)
    items["text/chunks"] = ([str(i) for i in range(len(texts))], tx_feats)
    fp = {"backbone": {"kind": "synthetic"}, "manifests": {s: file_sha256(p) for s, p in manifests.items()}}
    cache = FeatureCache.create(root / "features", fingerprint=fp, tables=tables,
                                dims={"audio": AUDIO_DIM, "text": TEXT_DIM},
                                extra={"manifests": {s: str(p) for s, p in manifests.items()}})
    for name, (ids, feats) in items.items():
        plan = cache.table(name).plan
        for k in range(plan.shards):
            lo, hi = plan.bounds(k)
            cache.table(name).write_shard(k, ids[lo:hi], feats[lo:hi])
    cache.write_json("glossary.json", {"keys": keys, "aliases": {}, "texts": keys})
    cache.write_json("chunk_texts.json", texts)
    write_forms(cache, "espeak", log=None)
    if audio_top:
        from transformers import Qwen2AudioEncoderConfig
        from shared.top_layers import AudioTowerTop, _config
        conf = Qwen2AudioEncoderConfig(d_model=AUDIO_DIM, encoder_layers=1, encoder_attention_heads=2,
                                       encoder_ffn_dim=32, num_mel_bins=8, max_source_positions=1500).to_dict()
        torch.manual_seed(seed)
        top = AudioTowerTop(_config("qwen2audio_encoder", conf), 1)
        save_top(root / "features/top_audio", "qwen2audio_encoder", 1, conf, top.state_dict())
    else:
        save_top(root / "features/top_audio", "identity", 0, None, {})
    save_top(root / "features/top_text", "identity", 0, None, {})
    return root / "features"
