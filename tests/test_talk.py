"""The talk evaluation: hints over whole recordings scored against the alignments' term spans (found, false
hints per minute, hints per window, delay), the truth read from a segments TSV with offsets, and the three
systems streamed end to end on a synthesised recording."""
import json

import numpy as np
import pytest
import soundfile as sf

from shared.glossary import load_glossary
from stage3_index.talk import HintCounts, Occurrence, count_hints, evaluate_talks, limit_talk, read_talks
from stage3_index.retriever import windows
from tests.test_prepare import textgrid
from tests.test_retriever import BANDS, NATO, ScriptASR, make_retriever

SR = 16000


def test_found_false_hints_and_delay_arithmetic():
    truth = [Occurrence("a", 1.0, 1.5), Occurrence("b", 3.0, 3.4), Occurrence("a", 6.0, 6.5)]
    windows = [(0.0, 2.0, ["a"]),           # a@1.0 found, delay 2.0 - 1.5
               (1.0, 3.0, ["a", "b"]),      # a true again; b only touches b@3.0 (no overlap): false
               (2.0, 4.0, ["b", "b"]),      # b found (one hint, however often named), delay 4.0 - 3.4
               (4.0, 6.0, ["a"]),           # touches a@6.0 only: false
               (5.0, 7.0, [])]              # a@6.0 never hinted
    c = count_hints(windows, truth, speech_seconds=120.0, unseen={"b"})
    assert (c.occurrences, c.found, c.hints, c.false_hints, c.windows) == (3, 2, 5, 2, 5)
    assert c.delays == pytest.approx([0.5, 0.6])
    f = c.figures()
    assert f["found_rate"] == pytest.approx(2 / 3, abs=1e-4) and f["unseen_found_rate"] == 1.0
    assert f["false_hints_per_min"] == 1.0 and f["hints_per_window"] == 1.0 and f["precision"] == 0.6
    assert f["delay_median"] == pytest.approx(0.55) and f["delay_p90"] == pytest.approx(0.59)
    # the first hint is the earliest-ending window's, whatever the order; a hint before the term's end is negative
    late_first = [(3.0, 5.0, ["a"]), (0.5, 1.2, ["a"])]
    assert count_hints(late_first, [Occurrence("a", 1.0, 1.5)], 60.0).delays == pytest.approx([-0.3])
    # talks add up
    total = c + count_hints([(0.0, 2.0, ["z"])], [], 60.0)
    assert (total.hints, total.false_hints, total.speech_seconds, total.occurrences) == (6, 3, 180.0, 3)
    assert total.figures()["false_hints_per_min"] == 1.0


def corpus(tmp_path, two_files=False):
    """talk.wav (12 s): segment s1 at 1.0-5.0 s says foxtrot at 2.0-3.0 s (tone band 5), segment s2 at
    6.0-11.0 s says 'charles' (an alias of charlie) at 7.0-8.2 s (tone band 2); optionally a second file."""
    rng = np.random.default_rng(0)
    wav = 0.003 * rng.standard_normal(12 * SR)
    for band, a, b, amp in ((5, 2.0, 3.0, 0.3), (2, 7.0, 8.2, 0.2)):
        t = np.arange(int((b - a) * SR)) / SR
        wav[int(a * SR):int(a * SR) + len(t)] += amp * np.sin(2 * np.pi * BANDS[band] * t)
    sf.write(tmp_path / "talk.wav", wav.astype(np.float32), SR, subtype="PCM_16")
    ali = tmp_path / "ali"
    ali.mkdir()
    (ali / "s1.TextGrid").write_text(textgrid([(0.1, 0.4, "we"), (1.0, 2.0, "foxtrot")], 4.0))
    (ali / "s2.TextGrid").write_text(textgrid([(0.2, 0.5, "and"), (1.0, 2.2, "Charles"), (2.5, 2.9, "then")], 5.0))
    rows = ["id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang",
            f"s2\ttalk.wav:{6 * SR}:{5 * SR}\t0\tx\tand charles then\ten",
            f"s1\ttalk.wav:{1 * SR}:{4 * SR}\t0\tx\twe foxtrot\ten"]
    if two_files:
        sf.write(tmp_path / "other.wav", np.zeros(3 * SR, np.float32), SR)
        (ali / "o1.TextGrid").write_text(textgrid([(0.5, 1.0, "delta")], 3.0))
        rows.append("o1\tother.wav\t0\ty\tdelta\ten")
    (tmp_path / "segments.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "glossary.json").write_text(json.dumps(NATO))
    (tmp_path / "alt2main.json").write_text(json.dumps({"charles": "charlie"}))
    return tmp_path / "segments.tsv", ali, tmp_path / "glossary.json", tmp_path / "alt2main.json"


def test_truth_spans_are_shifted_by_each_segments_offset_and_grouped_by_file(tmp_path):
    seg, ali, g, a = corpus(tmp_path, two_files=True)
    talks = read_talks(seg, ali, load_glossary(g, a, log=None))
    assert [t.name for t in talks] == ["talk", "other"]
    t = talks[0]
    assert t.segments == [(1.0, 5.0), (6.0, 11.0)] and t.speech_seconds == 9.0
    assert t.occurrences == [Occurrence("foxtrot", 2.0, 3.0), Occurrence("charlie", 7.0, 8.2)]
    assert talks[1].occurrences == [Occurrence("delta", 0.5, 1.0)] and talks[1].segments == [(0.0, 3.0)]
    # a limit keeps whole segments: s2 would be cut at 8 s, so only s1 and its foxtrot remain
    cut = limit_talk(t, 8.0)
    assert cut.end == 5.0 and cut.segments == [(1.0, 5.0)] and [o.key for o in cut.occurrences] == ["foxtrot"]
    assert limit_talk(t, 0.5).segments == [(1.0, 5.0)]          # at least one segment
    assert limit_talk(t, 60.0) is t and limit_talk(t, 0) is t


def band_retriever(gloss):
    """make_retriever with the glossary's keys in the glossary's order (each key's tone band = NATO's)."""
    from stage3_index.retriever import GlossaryIndex
    r = make_retriever(threshold=0.8)
    vecs = np.eye(8, dtype=np.float32)[[NATO.index(k) for k in gloss.keys]]
    r.glossary = GlossaryIndex(list(gloss.keys), vecs, np.arange(len(gloss.keys)), keys=list(gloss.keys),
                               aliases=dict(gloss.aliases))
    return r


def test_the_three_systems_over_a_streamed_talk(tmp_path):
    from stage3_index.cascade import CascadeMatcher
    from stage3_index.retriever import TranscriptEvidence
    seg, ali, g, a = corpus(tmp_path)
    gloss = load_glossary(g, a, log=None)
    r = band_retriever(gloss)
    asr = ScriptASR("the delta wing")           # an ASR that hears 'delta' everywhere: never spoken
    r.evidence = TranscriptEvidence(asr, CascadeMatcher(*r.glossary.forms()), 2.0, 1.5,
                                    {"cascade_threshold": 0.9, "how": "given by the test"})
    rep = evaluate_talks(tmp_path / "run", seg, ali, g, a, name="t", retriever=r, log=None)
    ours, fused, casc = rep["systems"]["ours"], rep["systems"]["fused"], rep["systems"]["cascade"]
    n_windows = len(windows(12 * SR, 1.92, 0.96))
    assert ours["windows"] == n_windows == asr.heard          # one ASR pass serves cascade and fused
    assert (ours["occurrences"], ours["found"], ours["false_hints"]) == (2, 2, 0)
    assert ours["threshold"] == 0.8 and -1.92 < ours["delay_median"] < 1.92
    # the cascade only ever hints delta: nothing found, one false hint per window
    assert casc["found"] == 0 and casc["false_hints"] == n_windows and casc["threshold"] == 0.9
    assert casc["false_hints_per_min"] == pytest.approx(n_windows / (9.0 / 60), abs=1e-3)
    # fused: delta (weight 2 x exact match) passes 1.5 in every window and is never spoken
    assert fused["false_hints"] >= n_windows and fused["weight"] == 2.0
    assert fused["hints_per_window"] >= 1.0
    saved = json.loads((tmp_path / "run/talks/t/report.json").read_text())
    assert saved["systems"] == rep["systems"]
    assert "| ours (audio only) |" in (tmp_path / "run/talks/t/report.md").read_text()
    # a limit of 5.5 s: only s1 (ends at 5.0 s) and its foxtrot
    rep = evaluate_talks(tmp_path / "run", seg, ali, g, a, name="t5", retriever=r, max_minutes=5.5 / 60, log=None)
    assert rep["systems"]["ours"]["occurrences"] == 1 and rep["audio_minutes"] == pytest.approx(5 / 60, abs=1e-3)
    assert rep["systems"]["ours"]["found"] == 1
    # without the transcript: ours alone, and the report says why
    r.evidence = None
    rep = evaluate_talks(tmp_path / "run", seg, ali, g, a, name="t0", retriever=r, transcript=False, log=None)
    assert list(rep["systems"]) == ["ours"] and "not asked for" in rep["notes"][0]
    assert rep["systems"]["ours"]["found"] == 2 and asr.heard == n_windows + len(windows(5 * SR, 1.92, 0.96))
