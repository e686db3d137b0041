"""The eval report as a whole, on a tiny cache and a hand-built model whose every score is known.

The audio side is the identity (mean of one frame, identity projection), so a chunk's embedding is
the unit vector placed by hand; the text side's rows (glossary forms, distractors) are placed by hand
too, through the `shared.termside` entry points evaluate calls. Every figure below is worked out in
the comments from those vectors.
"""
import json

import numpy as np
import pytest
import torch

import stage3_index.evaluate as ev
from shared.cache import FeatureCache, TablePlan, file_sha256
from shared.config import load_config
from shared.errors import BadInput
from shared.heads import RetrievalModel, Tower
from shared.manifest import Chunk, write_chunks
from shared.top_layers import IdentityTop
from stage3_index.compare import compare
from stage3_index.evaluate import evaluate, report_markdown

D = 8


def e(i, w=1.0):
    v = np.zeros(D, dtype=np.float32)
    v[i] = w
    return v


def unit(v):
    return (v / np.linalg.norm(v)).astype(np.float32)


# own glossary: ids 0..5; e_i is term i; the alias "alfa" of alpha is the row e6
KEYS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
GLOSS = [e(i) for i in range(6)] + [e(6)]
OWNER = [0, 1, 2, 3, 4, 5, 0]
# distractors in table order; "Alpha" and "ALFA" equal a key / alias and must be dropped at eval
DIST_TEXTS = ["Alpha", "Zulu", "ALFA", "Yankee", "Xray"]
DIST = [e(0), unit(0.95 * e(4) + 0.312 * e(7)), e(6), unit(0.96 * e(3) + 0.28 * e(1)), e(7)]

TRAIN = [("alpha", e(0)), ("bravo", e(1)), ("charlie", e(2)), ("delta", e(3))]   # limit 3: delta unseen
DEV = [("alpha", e(0)), ("bravo", unit(0.7 * e(1) + 0.714 * e(7))), ("charlie", unit(0.5 * e(2) + 0.866 * e(7))),
       ("", e(7))]                                   # dev top-1 hits score 1.0, 0.7, 0.5
TEST = [("alpha", e(0)),                             # c0: alpha 1.0, hit@1
        ("alpha", e(6)),                             # c1: through the alias row, hit@1
        ("bravo", 0.6 * e(1) + 0.8 * e(3)),          # c2: delta 0.8 > bravo 0.6: miss@1, hit@2
        ("delta", 0.96 * e(3) + 0.28 * e(1)),        # c3: delta 0.96, hit@1
        ("echo", 0.8 * e(7) + 0.6 * e(4)),           # c4: echo 0.6, hit@1
        ("", unit(0.9 * e(5) + 0.436 * e(7))),       # n0: no term, but foxtrot 0.9
        ("", e(7)),                                  # n1: no term, max score 0
        ("charlie echo", 0.8 * e(2) + 0.6 * e(4))]   # c6: charlie 0.8 hit@1, echo 0.6 hit@2
TRANSCRIPTS = ["we saw alpha today", "the alfa team", "bravo", "delta", "foxtrot", "nothing here", "",
               "charlie and echo"]
VECS = {}   # cache root -> (glossary rows, owner, distractor rows)


def build(root, keys, splits, *, backbone="synthetic", weights="w1", gloss=GLOSS, owner=OWNER,
          dist_texts=None, dist=None, said=None):
    """`said` {(split, i): chunk text}: what chunk i says, when more than its terms."""
    said = said or {}
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    manifests, tables, items = {}, {}, {}
    for split, rows in splits.items():
        chunks, feats = [], []
        for i, (terms, v) in enumerate(rows):
            t = terms.split()
            chunks.append(Chunk(id=f"{split}{i}", audio="/none.wav", audio_offset=0.0, audio_duration=0.02,
                                term_chunk_text=said.get((split, i), terms or f"nothing {i}"),
                                term_chunk_audio_ground_truth_terms=t,
                                is_no_term_chunk=not t, split=split))
            feats.append(np.asarray(v, dtype=np.float32)[None])
        manifests[split] = corpus / f"{split}.jsonl"
        write_chunks(chunks, manifests[split])
        tables[f"audio/{split}"] = TablePlan(len(rows), 64)
        items[f"audio/{split}"] = ([c.id for c in chunks], feats)
    texts = sorted({said.get((split, i), terms or f"nothing {i}") for split, rows in splits.items()
                    for i, (terms, _) in enumerate(rows)})
    if dist_texts:
        tables["text/distractors"] = TablePlan(len(dist_texts), 64)
        items["text/distractors"] = ([str(i) for i in range(len(dist_texts))], [x[None] for x in dist])
    fp = {"backbone": {"kind": backbone}, "text_field": "term", "manifests": {s: file_sha256(p) for s, p in manifests.items()}}
    cache = FeatureCache.create(root / "features", fingerprint=fp, tables=tables, dims={"audio": D, "text": D},
                                extra={"manifests": {s: str(p) for s, p in manifests.items()},
                                       "backbone_fingerprint": {"weights_sha256": weights}})
    for name, (ids, feats) in items.items():
        cache.table(name).write_shard(0, ids, feats)
    aliases = {"alfa": "alpha"} if "alpha" in keys else {}
    cache.write_json("glossary.json", {"keys": keys, "aliases": aliases, "texts": keys, "text_field": "term"})
    cache.write_json("chunk_texts.json", texts)
    if dist_texts:
        cache.write_json("distractors.json", dist_texts)
    VECS[str(cache.root)] = (np.stack([unit(g) for g in gloss]), np.asarray(owner, dtype=np.int64),
                             None if dist is None else np.stack(dist))
    return cache


def identity_model():
    audio = Tower(IdentityTop(), D, D)
    with torch.no_grad():
        audio.proj.weight.copy_(torch.eye(D))
        audio.proj.bias.zero_()
    return RetrievalModel(audio, Tower(IdentityTop(), D, D)).eval()


def make_run(root, cache, **sets):
    sets = {"train.limit": 3, "eval.ks": "1,2,3", "eval.glossary_sizes": "6,7,100", "eval.keep_hits": 0.6,
            "eval.index": "Flat", **sets}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    run = root / "run"
    run.mkdir()
    torch.save({"model": {}, "spec": {"features": str(cache.root)}, "cache_fingerprint": cache.fingerprint,
                "config": cfg.to_dict()}, run / "best.pt")
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    return run


@pytest.fixture(autouse=True)
def hand_placed(monkeypatch):
    model = identity_model()
    monkeypatch.setattr(ev, "load_model", lambda ckpt, features=None: (model, ckpt))
    monkeypatch.setattr(ev, "embed_glossary", lambda m, cache: VECS[str(cache.root)][:2])
    monkeypatch.setattr(ev, "embed_text_table", lambda m, cache, name: VECS[str(cache.root)][2])


@pytest.fixture
def own(tmp_path):
    cache = build(tmp_path / "own", KEYS, {"train": TRAIN, "dev": DEV, "test": TEST},
                  dist_texts=DIST_TEXTS, dist=DIST)
    (cache.root / "transcripts").mkdir()
    (cache.root / "transcripts/test.jsonl").write_text(
        "".join(json.dumps({"id": f"test{i}", "text": t}) + "\n" for i, t in enumerate(TRANSCRIPTS)))
    return cache, make_run(tmp_path / "own", cache)


def quiet(*_):
    pass


def test_the_whole_report_has_the_known_figures(own):
    cache, run = own
    rep = evaluate(run, log=quiet)
    on_disk = json.loads((run / "eval/test/report.json").read_text())
    assert set(on_disk) == {"recall", "recall_seen", "recall_unseen", "recall_unseen_strict", "by_glossary_size",
                            "rejection", "queries", "glossary_size", "qps", "baseline", "fused",
                            "second_stage", "first_stage"}
    assert rep["fused"] is None                                       # no dev transcripts: not reported
    assert rep["second_stage"] is False and rep["first_stage"] is None     # no RUN/second.pt: first stage only
    # 7 queries: c0 alpha, c1 alpha, c2 bravo, c3 delta, c4 echo, c6 charlie, c6 echo
    assert rep["queries"] == 7 and rep["glossary_size"] == 6
    assert rep["recall"] == pytest.approx({"1": 5 / 7, "2": 1.0, "3": 1.0})
    # seen = the first 3 train chunks (train.limit): alpha, bravo, charlie; delta is in train but after the limit
    assert (rep["seen_queries"], rep["unseen_queries"]) == (4, 3)
    assert rep["recall_seen"]["1"] == pytest.approx(3 / 4)            # bravo misses
    assert rep["recall_unseen"]["1"] == pytest.approx(2 / 3)          # c6's echo misses
    for k in ("1", "2", "3"):                                         # recall = query-weighted mean of the two
        assert rep["recall"][k] == pytest.approx((4 * rep["recall_seen"][k] + 3 * rep["recall_unseen"][k]) / 7)
    rej = rep["rejection"]
    # term chunks' max scores 1, 1, .8, .96, .6, .8 against no-term .9 and 0: 9 of 12 pairs
    assert rej["auroc"] == pytest.approx(0.75)
    # only chunks whose top-1 is right (not c2): 1, 1, .96, .6, .8: 8 of 10 pairs
    assert rej["auroc_top1_correct"] == pytest.approx(0.8)
    # dev top-1 hits 1.0, 0.7, 0.5; keep 0.6 of 3 -> the 2nd highest
    assert rej["threshold"] == pytest.approx(0.7, abs=1e-3)
    assert rej["far"] == pytest.approx(0.5)                           # n0 (.9) is accepted, n1 (0) not
    assert rej["recall_at_threshold"] == pytest.approx(4 / 7)         # c4's hit (.6) is below it
    # glossary sizes: 5 split terms (foxtrot is not in test) + distractors Zulu, Yankee, Xray (Alpha, ALFA dropped)
    by = rep["by_glossary_size"]
    assert list(by) == ["6", "7", "8"]                                # keyed by real size: 100 asked, 8 exist
    assert [by[s]["distractors"] for s in by] == [1, 2, 3]
    assert by["6"]["recall"] == pytest.approx({"1": 4 / 7, "2": 1.0, "3": 1.0})      # Zulu beats echo in c4
    assert by["7"]["recall"] == pytest.approx({"1": 3 / 7, "2": 6 / 7, "3": 1.0})    # Yankee beats delta (c2, c3)
    assert by["8"]["recall"] == pytest.approx({"1": 3 / 7, "2": 5 / 7, "3": 1.0})    # Xray pushes c4's echo to 3
    assert all(by[s]["qps"] > 0 and by[s]["index"] == "Flat" for s in by)
    # the cascade on the hand-written transcripts: c4 says "foxtrot", c6's echo ties charlie and loses on id
    b = rep["baseline"]
    assert b["recall"]["1"] == pytest.approx(5 / 7)
    assert b["recall_seen"]["1"] == pytest.approx(1.0) and b["recall_unseen"]["1"] == pytest.approx(1 / 3)
    assert b["recall"]["2"] >= 6 / 7 - 1e-9                           # c6's echo is 2nd
    assert b["auroc"] == pytest.approx(1.0)                          # every term chunk has an exact match
    assert set(b["by_glossary_size"]) == {"6", "7", "8"}
    md = (run / "eval/test/report.md").read_text()
    assert "| cascade (ASR + fuzzy match): all |" in md and "| glossary 7 (2 distractors) |" in md
    assert "AUROC (top-1 correct)" in md
    for name in ("report.md", "details.json", "recall_at_k.png", "max_scores.png", "glossary.index"):
        assert (run / "eval/test" / name).is_file()
    assert "baseline.recall.5" in compare([run], None, log=quiet)


def test_strictly_unseen_leaves_out_terms_whose_words_were_heard(tmp_path):
    """Train chunk 2 also says "echo": echo stays unseen by key (no trained chunk holds the term) but is
    not strictly unseen; delta (after train.limit 3) is both."""
    cache = build(tmp_path / "c", KEYS, {"train": TRAIN, "dev": DEV, "test": TEST},
                  said={("train", 2): "charlie and an echo", ("train", 3): "delta"})
    run = make_run(tmp_path / "c", cache)
    rep = evaluate(run, log=quiet)
    # unseen: c3 delta (hit@1), c4 echo (hit@1), c6 echo (2nd): R@1 2/3; strictly: c3 delta alone
    assert (rep["unseen_queries"], rep["unseen_strict_queries"], rep["unseen_strict_terms"]) == (3, 1, 1)
    assert rep["recall_unseen"]["1"] == pytest.approx(2 / 3)
    assert rep["recall_unseen_strict"] == pytest.approx({"1": 1.0, "2": 1.0, "3": 1.0})
    assert "| strictly unseen terms (no word heard in training) | 1.000 | 1.000 | 1.000 | 1 |" in \
        (run / "eval/test/report.md").read_text()
    # (train chunk 3 says "delta", but after train.limit: not heard.) Every form counts: "tesla" was heard
    # in "nikola tesla", kubernetes through its alias k8s; docker and delta were never heard
    assert ev.strictly_unseen_terms({"keys": ["nikola tesla", "tesla", "docker", "kubernetes", "delta"],
                                     "aliases": {"k8s": "kubernetes"}},
                                    {"nikola tesla"}, {"we", "use", "k8s", "nikola", "tesla"}).tolist() == \
        [False, False, True, False, True]


def test_distractors_that_clash_with_the_corpus_are_dropped(tmp_path):
    """"Echo Park" holds the glossary term echo, "Alpha" is one, "Nothing" is spoken in no-term chunks
    ("nothing 5"): only Zulu and Yankee pad the glossary."""
    cache = build(tmp_path / "c", KEYS, {"train": TRAIN, "dev": DEV, "test": TEST},
                  dist_texts=["Alpha", "Zulu", "Echo Park", "Yankee", "Nothing"], dist=DIST)
    run = make_run(tmp_path / "c", cache)
    rep = evaluate(run, log=quiet)
    assert rep["distractors"] == 2 and rep["distractors_dropped"] == {"glossary": 2, "spoken": 1}
    by = rep["by_glossary_size"]
    assert list(by) == ["6", "7"] and [by[s]["distractors"] for s in by] == [1, 2]
    assert by["6"]["recall"]["1"] == pytest.approx(4 / 7)             # Zulu beats echo in c4, as before
    assert by["7"]["recall"]["1"] == pytest.approx(3 / 7)             # and Yankee beats delta in c3


def test_config_and_set_override_the_runs_eval_keys(own):
    cache, run = own
    rep = evaluate(run, overrides=["eval.ks=1", "eval.glossary_sizes=7", "eval.keep_hits=1.0"], log=quiet)
    assert list(rep["recall"]) == ["1"] and list(rep["by_glossary_size"]) == ["7"]
    assert rep["rejection"]["threshold"] == pytest.approx(0.5, abs=1e-3)       # keep all three dev hits


def test_no_transcripts_means_no_baseline_and_says_how(own):
    cache, run = own
    (cache.root / "transcripts/test.jsonl").unlink()
    logs = []
    rep = evaluate(run, log=logs.append)
    assert rep["baseline"] is None
    assert any("stage1_extract transcribe" in m and "--split test" in m for m in logs)
    assert "No cascade baseline" in report_markdown(rep, "run")


def test_dev_never_picks_its_own_threshold(own):
    cache, run = own
    logs = []
    rep = evaluate(run, "dev", log=logs.append)
    assert rep["rejection"]["threshold"] is None and rep["rejection"]["far"] is None
    assert any("not reported on dev itself" in m for m in logs)
    assert (run / "eval/dev/report.json").is_file()


def test_a_dev_without_hits_leaves_the_threshold_null(tmp_path):
    bad_dev = [("alpha", e(1)), ("", e(7))]                # its only term chunk ranks bravo first
    cache = build(tmp_path / "c", KEYS, {"train": TRAIN, "dev": bad_dev, "test": TEST})
    run = make_run(tmp_path / "c", cache)
    logs = []
    rep = evaluate(run, log=logs.append)
    assert rep["rejection"]["threshold"] is None
    assert any("dev has no top-1 hit" in m for m in logs)
    assert rep["rejection"]["auroc"] == pytest.approx(0.75)         # the AUROCs need no threshold
    assert rep["by_glossary_size"] == {}                             # this cache has no distractors


def test_another_corpus_compares_terms_by_key(own, tmp_path):
    cache, run = own
    # its own glossary: bravo (seen in training), delta (after train.limit) and golf (never)
    other = build(tmp_path / "other", ["bravo", "delta", "golf"],
                  {"test": [("bravo", e(0)), ("golf", e(2)), ("delta", 0.6 * e(1) + 0.8 * e(2)), ("", e(7))]},
                  gloss=[e(0), e(1), e(2)], owner=[0, 1, 2])
    rep = evaluate(run, "test", features=other.root, log=quiet)
    assert (run / "eval/features.test/report.json").is_file()
    assert rep["glossary_size"] == 3 and rep["queries"] == 3
    assert (rep["seen_queries"], rep["unseen_queries"]) == (1, 2)
    assert rep["recall_seen"]["1"] == 1.0 and rep["recall_unseen"]["1"] == pytest.approx(0.5)
    assert rep["rejection"]["threshold"] == pytest.approx(0.7, abs=1e-3)      # still the run's own dev


@pytest.mark.parametrize("what, kwargs", [("backbone.kind", {"backbone": "other"}),
                                          ("backbone_fingerprint.weights_sha256", {"weights": "w2"})])
def test_another_backbone_is_refused_naming_the_keys(own, tmp_path, what, kwargs):
    cache, run = own
    other = build(tmp_path / "x", KEYS, {"test": TEST}, **kwargs)
    with pytest.raises(BadInput, match="another backbone") as err:
        evaluate(run, features=other.root, log=quiet)
    assert what in str(err.value)
    assert not (run / "eval/features.test").exists()


def test_a_relative_feature_path_is_found_from_the_run_folder(own, tmp_path, monkeypatch):
    cache, run = own
    ckpt = torch.load(run / "best.pt", weights_only=False)
    ckpt["spec"]["features"] = "own/features"                # relative to where training ran (tmp_path)
    torch.save(ckpt, run / "best.pt")
    monkeypatch.chdir(run)                                   # evaluated from somewhere else
    assert ev.resolve_features("own/features", run) == tmp_path / "own/features"
    assert evaluate(run, log=quiet)["queries"] == 7
    with pytest.raises(BadInput, match="not found"):
        ev.resolve_features("nowhere/features", run)


def test_ours_plus_transcript_takes_its_weight_from_dev(own):
    cache, run = own
    (cache.root / "transcripts/dev.jsonl").write_text("".join(
        json.dumps({"id": f"dev{i}", "text": t}) + "\n" for i, t in enumerate(["alpha", "bravo", "charlie", ""])))
    logs = []
    # dev is already right at rank 1 without the transcript: every weight ties, the smallest (least ASR) wins
    rep = evaluate(run, overrides=["eval.fusion_weights=0,0.5,2"], log=logs.append)
    assert rep["fused"]["weight"] == 0.0 and rep["fused"]["recall"] == rep["recall"]
    assert any("picked on dev" in m for m in logs)
    rep = evaluate(run, overrides=["eval.fusion_weights=0.5"], log=quiet)
    f = rep["fused"]
    # c2: bravo 0.6 + 0.5 beats delta 0.8 (hit@1 now); c4 says "foxtrot": foxtrot 0 + 0.5 < echo 0.6 + 0.5 * 0.2
    assert f["weight"] == 0.5 and f["recall"]["1"] == pytest.approx(6 / 7)
    assert f["recall"]["1"] > rep["recall"]["1"]
    assert "ours + transcript (weight 0.5 from dev)" in (run / "eval/test/report.md").read_text()
    # on dev itself the weight would be picked on the figures it reports: none, and the note says why
    logs = []
    (cache.root / "transcripts/dev.jsonl").write_text("".join(
        json.dumps({"id": f"dev{i}", "text": t}) + "\n" for i, t in enumerate(["alpha", "bravo", "charlie", ""])))
    rep = evaluate(run, "dev", overrides=["eval.fusion_weights=0.5"], log=logs.append)
    assert rep["baseline"] is not None and rep["fused"] is None
    assert "fusion weight is picked" in rep["fused_note"] and any("fusion weight is picked" in m for m in logs)
    assert "No 'ours + transcript'" in (run / "eval/dev/report.md").read_text()
