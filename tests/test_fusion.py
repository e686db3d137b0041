"""Ours + transcript: score-level fusion of the audio ranking with the cascade's fuzzy scores."""
import numpy as np

from stage3_index.fusion import fuse, pick_weight


def test_fusion_adds_the_transcripts_evidence_and_its_candidates():
    # 4 terms, one row each; the audio prefers term 0, the transcript spells term 2 (not in our top 2)
    vecs = np.eye(4, dtype=np.float32)
    owner = np.arange(4)
    audio = np.array([[0.9, 0.5, 0.4, 0.0]], dtype=np.float32)
    ours_ids, ours_scores = np.array([[0, 1]]), np.array([[0.9, 0.5]], dtype=np.float32)
    fuzzy = [np.array([0.0, 0.2, 1.0, 0.0], dtype=np.float32)]
    ids, scores = fuse(ours_ids, ours_scores, audio, vecs, owner, fuzzy, weight=0.0, k=3)
    assert ids.tolist() == [[0, 1, -1]]                        # weight 0: our ranking, nothing added
    ids, scores = fuse(ours_ids, ours_scores, audio, vecs, owner, fuzzy, weight=0.6, k=3)
    assert ids.tolist() == [[2, 0, 1]]                          # 0.4 + 0.6 > 0.9 > 0.5 + 0.12
    np.testing.assert_allclose(scores[0], [1.0, 0.9, 0.62], rtol=1e-6)
    # a term with several rows is scored by its best row
    vecs2 = np.vstack([vecs, [[0, 0, 0.8, 0]]]).astype(np.float32)
    owner2 = np.array([0, 1, 2, 3, 3])
    ids, _ = fuse(ours_ids, ours_scores, np.array([[0.9, 0.5, 0.0, 0.0]], np.float32), vecs2, owner2,
                  [np.array([0, 0, 0, 0.5], np.float32)], weight=1.0, k=2)
    assert ids.tolist() == [[0, 1]]                             # 0 + 0.5 ties with term 1: the smaller id wins
    ids, _ = fuse(ours_ids, ours_scores, np.array([[0.9, 0.5, 0.0, 0.0]], np.float32), vecs2, owner2,
                  [np.array([0, 0, 0, 0.7], np.float32)], weight=1.0, k=2)
    assert ids.tolist() == [[0, 3]]


def test_weight_is_the_best_on_dev_and_ties_prefer_less_asr():
    table = {0.0: {"1": 0.5, "10": 0.8}, 0.3: {"1": 0.6, "10": 0.9}, 0.5: {"1": 0.6, "10": 0.9}}
    w, tried = pick_weight(lambda w: table[w], [0.5, 0.0, 0.3])
    assert w == 0.3 and set(tried) == {0.0, 0.3, 0.5}
