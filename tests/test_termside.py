"""The text side's form parts: forms cached once, n-gram ids deterministic, alias rows, and an unseen
term found from its spelling where the LM part (no form) cannot find it."""
import json
import string

import numpy as np
import pytest
import torch

from shared.cache import FeatureCache, TablePlan, file_sha256
from shared.config import load_config
from shared.g2p import phonemize
from shared.heads import TextSide
from shared.manifest import Chunk, write_chunks
from shared.termside import (TermTable, form_grams, glossary_forms, gram_ids, rows_to_terms, spoken_rows,
                             term_tables, write_forms)
from shared.top_layers import save_top


def test_phonemes_are_deterministic_and_without_stress():
    a = phonemize(["Kubernetes", "Nintendo Switch", ""])
    assert a == phonemize(["Kubernetes", "Nintendo Switch", ""])
    assert a[2] == "" and " " in a[1] and "ˈ" not in a[0] and "ˌ" not in "".join(a)
    assert phonemize(["docker"])[0] != phonemize(["dock"])[0]


def test_gram_ids_are_stable_and_kind_specific():
    a = gram_ids("docker", "chars", 1 << 16)
    assert a.tolist() == gram_ids("docker", "chars", 1 << 16).tolist()      # crc32, not Python's hash
    assert set(a.tolist()) != set(gram_ids("docker", "phones", 1 << 16).tolist())
    # shared n-grams give shared ids: "dock" is inside "docker"
    assert set(gram_ids("dock", "chars", 1 << 16).tolist()) & set(a.tolist())
    assert a.max() < 1 << 16 and np.all(np.diff(a) > 0)
    grams = form_grams({"spell": ["ab", ""], "phones": ["æb", ""]}, ["chars", "phones"], 1 << 10)
    assert len(grams[1]) == 1                                               # empty text: one id, never none
    with pytest.raises(Exception, match="no pronunciations"):
        form_grams({"spell": ["ab"], "phones": None}, ["phones"], 1 << 10)


def test_alias_rows_and_spoken_form():
    g = {"keys": ["kubernetes", "playstation"], "texts": ["Kubernetes", "PlayStation"],
         "aliases": {"k8s": "kubernetes", "ps5": "playstation"}, "text_field": "term"}
    forms, owner = glossary_forms(g)
    assert forms == ["Kubernetes", "PlayStation", "k8s", "ps5"] and owner.tolist() == [0, 1, 0, 1]
    rows_of = {0: [0, 2], 1: [1, 3]}
    assert spoken_rows("we deploy on k8s today", [0], forms, owner, rows_of) == [2]
    assert spoken_rows("we deploy on kubernetes", [0], forms, owner, rows_of) == [0]
    ids, scores = rows_to_terms(np.array([[2, 0, 3, 1]]), np.array([[0.9, 0.8, 0.5, 0.4]]), owner, 3)
    assert ids.tolist() == [[0, 1, -1]] and scores[0, 0] == np.float32(0.9)


def _word(rng):
    return "".join(rng.choice(list("bdgklmnprstvz"))+rng.choice(list("aeiou")) for _ in range(3))


def _form_cache(root, n_terms=60, n_unseen=15, per_term=6, seed=0):
    """Audio frames spell the spoken term: one noisy frame per letter (a fixed random vector per
    letter). The LM features are random per term: they say nothing of how a term is written."""
    rng = np.random.default_rng(seed)
    D = 16
    letters = {c: rng.standard_normal(D).astype(np.float32) for c in string.ascii_lowercase}
    terms = sorted({_word(rng) for _ in range(n_terms * 2)})[:n_terms]
    unseen = set(range(n_terms - n_unseen, n_terms))
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    manifests, tables, items = {}, {}, {}
    for split in ("train", "dev", "test"):
        pool = [t for t in range(n_terms) if (t in unseen) == (split != "train")] if split != "dev" else \
            list(range(n_terms))
        chunks, feats = [], []
        for i, t in enumerate([t for t in pool for _ in range(per_term if split == "train" else 2)]):
            x = np.stack([letters[c] for c in terms[t]]) + 0.3 * rng.standard_normal((len(terms[t]), D))
            feats.append(x.astype(np.float32))
            chunks.append(Chunk(id=f"{split}{i}", audio="/none.wav", audio_offset=0.0, audio_duration=0.5,
                                term_chunk_text=terms[t], term_chunk_audio_ground_truth_terms=[terms[t]],
                                split=split))
        manifests[split] = corpus / f"{split}.jsonl"
        write_chunks(chunks, manifests[split])
        tables[f"audio/{split}"] = TablePlan(len(chunks), 512)
        items[f"audio/{split}"] = ([c.id for c in chunks], feats)
    tables["text/glossary"] = TablePlan(n_terms, 512)
    tables["text/chunks"] = TablePlan(n_terms, 512)
    lm = [rng.standard_normal((2, D)).astype(np.float32) for _ in range(n_terms)]
    items["text/glossary"] = ([str(i) for i in range(n_terms)], lm)
    items["text/chunks"] = ([str(i) for i in range(n_terms)], lm)
    fp = {"backbone": {"kind": "synthetic"}, "manifests": {s: file_sha256(p) for s, p in manifests.items()}}
    cache = FeatureCache.create(root / "features", fingerprint=fp, tables=tables, dims={"audio": D, "text": D},
                                extra={"manifests": {s: str(p) for s, p in manifests.items()}})
    for name, (ids, feats) in items.items():
        cache.table(name).write_shard(0, ids, feats)
    cache.write_json("glossary.json", {"keys": terms, "aliases": {}, "texts": terms, "text_field": "term"})
    cache.write_json("chunk_texts.json", terms)
    save_top(root / "features/top_audio", "identity", 0, None, {})
    save_top(root / "features/top_text", "identity", 0, None, {})
    return FeatureCache(root / "features")


def test_forms_are_cached_once_and_redone_when_texts_change(tmp_path):
    cache = _form_cache(tmp_path, n_terms=10, n_unseen=2, per_term=1)
    assert write_forms(cache, "espeak", log=None) is True
    first = (cache.root / "forms.json").read_text()
    assert write_forms(cache, "espeak", log=None) is False                  # cached: nothing recomputed
    forms = json.loads(first)
    assert len(forms["glossary"]["spell"]) == 10 and len(forms["glossary"]["phones"]) == 10
    cache.write_json("chunk_texts.json", cache.read_json("chunk_texts.json")[:5])
    assert write_forms(cache, "espeak", log=None) is True
    assert len(json.loads((cache.root / "forms.json").read_text())["chunks"]["spell"]) == 5
    assert write_forms(cache, "none", log=None) is True                     # another G2P: recomputed
    assert json.loads((cache.root / "forms.json").read_text())["chunks"]["phones"] is None


def _unseen_recall(cache, encoders, tmp_path):
    from stage2_train.train import train
    from stage3_index.evaluate import evaluate
    cfg = load_config(None, [f"text.encoders={','.join(encoders)}", "text.g2p=none", "text.buckets=4096",
                             "text.bag_dim=32", "train.proj_dim=32", "train.epochs=12", "train.batch_size=32",
                             "train.lr=5e-3", "train.patience=12", "train.in_memory=yes", "train.threads=1",
                             "loss.w_hard=0", "loss.w_reject=0", "eval.glossary_sizes=[]"])
    run = tmp_path / f"run-{'-'.join(encoders)}"
    train(cfg, cache.root, run, log=lambda *_: None)
    return evaluate(run, "test", log=lambda *_: None)["recall_unseen"]


def test_an_unseen_term_is_found_by_its_spelling_not_by_its_meaning(tmp_path):
    torch.set_num_threads(1)
    cache = _form_cache(tmp_path)
    write_forms(cache, "none", log=None)
    chars = _unseen_recall(cache, ["chars"], tmp_path)
    lm = _unseen_recall(cache, ["lm"], tmp_path)
    # 15 unseen test terms among 60: chance R@5 is ~0.08
    assert chars["5"] > 0.6, chars
    assert lm["5"] < 0.35, lm
    assert chars["5"] > lm["5"] + 0.3


def test_text_side_reads_a_term_table():
    side = TextSide(["chars", "phones"], None, proj_dim=8, buckets=64, bag_dim=4)
    table = TermTable(None, np.arange(3), [np.array([1, 2]), np.array([3]), np.array([5, 6, 7])])
    out = side(**table.batch([0, 2]))
    assert out.shape == (2, 8) and torch.allclose(out.norm(dim=1), torch.ones(2))
    dropped = table.batch([2], gram_dropout=0.99, rng=np.random.default_rng(0))
    assert len(dropped["gram_ids"]) == 1                                    # one n-gram always stays
    with pytest.raises(ValueError, match="text.encoders"):
        TextSide(["spelling"], None, proj_dim=8)


@pytest.mark.parametrize("encoders", [["lm"], ["chars", "phones"], ["lm", "chars"]])
def test_each_text_part_trains_on_a_tiny_qwen2audio_cache(tmp_path, encoders):
    """The Qwen2-Audio path (audio tower + its Qwen2 LM as text model, random tiny weights): stage 1
    caches the LM's token states and the forms; every text part trains on them and evaluates."""
    from transformers import WhisperFeatureExtractor
    from stage1_extract.extract import extract
    from stage2_train.train import train
    from stage3_index.evaluate import evaluate
    from tests.test_extract import make_corpus
    from tests.tiny import tiny_bpe_tokenizer, tiny_qwen2audio_model
    torch.set_num_threads(1)
    model_dir = tmp_path / "tiny-qwen2-audio"
    tiny_qwen2audio_model(layers=2).save_pretrained(model_dir)
    tiny_bpe_tokenizer(["say alpha beta gamma delta 0 1 2 3"]).save_pretrained(model_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(model_dir)
    base = make_corpus(tmp_path, n_train=24, n_test=6)
    sets = [f"data.glossary={base.data.glossary}", "data.alt2main=", f"data.chunks={base.data.chunks}",
            f"cache.root={tmp_path / 'cache'}", "backbone.kind=qwen2audio", f"backbone.audio_model={model_dir}",
            "backbone.audio_unfreeze=1", "backbone.text_unfreeze=1", f"text.encoders={','.join(encoders)}",
            "train.epochs=1", "train.batch_size=8", "train.proj_dim=8", "text.buckets=256", "text.bag_dim=8",
            "eval.glossary_sizes=[]"]
    cfg = load_config(None, sets)
    extract(cfg, log=lambda *_: None)
    cache = FeatureCache(tmp_path / "cache/features/demo")
    forms = json.loads((cache.root / "forms.json").read_text())
    assert forms["glossary"]["spell"] == ["alpha", "beta gamma", "delta"]
    assert all(forms["glossary"]["phones"])
    tables = term_tables(cache, {"text_encoders": encoders, "buckets": 256}, ("glossary", "chunks"))
    assert (tables["glossary"].lm is not None) == ("lm" in encoders)
    assert (tables["glossary"].grams is not None) == (encoders != ["lm"])
    train(cfg, cache.root, tmp_path / "run", log=lambda *_: None)
    ckpt = torch.load(tmp_path / "run/best.pt", weights_only=False)
    assert ckpt["spec"]["text_encoders"] == encoders
    assert any(k.startswith("text.bag.") for k in ckpt["model"]) == (encoders != ["lm"])
    assert any(".top.layers.0." in k for k in ckpt["model"] if k.startswith("text.lm.")) == ("lm" in encoders)
    report = evaluate(tmp_path / "run", "train", log=lambda *_: None)
    assert report["queries"] == 24
    # 3 terms: every one is ranked, so R@5 and R@10 are 1 unless rows, ids or queries get lost or mixed up
    assert report["recall"]["5"] == report["recall"]["10"] == 1.0
    # against a brute-force ranking of the checkpoint's own embeddings (cosines, argmax, rows folded to
    # terms by hand): each chunk's top score and R@1 agree with eval's index, folding and queries
    from shared.heads import embed
    from shared.termside import embed_glossary
    from stage2_train.data import SplitData
    from stage3_index.evaluate import compute_report, eval_inputs
    e = eval_inputs(tmp_path / "run", "train")
    _, _, top_scores, _ = compute_report(e, log=lambda *_: None)
    data = SplitData(e.own, "train")
    audio = embed(e.model.audio, data.audio.items(range(len(data))))
    rows, owner = embed_glossary(e.model, e.own)
    cos = audio @ np.asarray(rows).T
    np.testing.assert_allclose(top_scores, cos.max(axis=1), atol=1e-5)       # chunk by chunk, in order
    top1 = np.asarray(owner)[cos.argmax(axis=1)]
    hits = [int(top1[i]) == t for i in range(len(data)) for t in set(data.terms[i])]
    assert len(hits) == 24 and report["recall"]["1"] == pytest.approx(np.mean(hits))


def test_the_bags_distinct_row_lookup_gives_the_embedding_bags_values_and_gradient():
    """TextSide._bag looks each distinct n-gram id up once; nn.EmbeddingBag itself is the reference."""
    torch.manual_seed(0)
    side = TextSide(["chars"], None, proj_dim=8, buckets=50, bag_dim=6)
    ids = torch.tensor([3, 7, 3, 3, 9, 7, 1, 49, 3], dtype=torch.int64)   # repeats within and across bags
    offsets = torch.tensor([0, 4, 6], dtype=torch.int64)
    ours = side._bag(ids, offsets)
    (ours * torch.arange(18.).view(3, 6)).sum().backward()
    mine = side.bag.weight.grad.coalesce().to_dense()
    side.bag.weight.grad = None
    ref = side.bag(ids, offsets)
    (ref * torch.arange(18.).view(3, 6)).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(mine, side.bag.weight.grad.coalesce().to_dense(), atol=1e-6)
    assert mine[3].abs().sum() > 0 and mine[2].abs().sum() == 0
