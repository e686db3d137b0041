"""Bad input through the real commands: each case stops with a message naming the file, the record
and the fix, or with --skip-bad is skipped into rejected.jsonl, and read = kept + rejected.

The readers' own unit tests live in test_audio.py, test_formats.py, test_prepare.py and
test_config.py; here the same inputs go through `extract` and `prepare` (and the CLIs, for exit
codes), which is what a user meets.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shared.cache import FeatureCache
from shared.errors import BadInput
from stage1_extract.extract import extract
from stage1_extract.prepare import prepare
from tests.test_extract import FakeBackbone, make_corpus
from tests.test_prepare import textgrid

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def quiet(*_):
    pass


def record(cid, audio, offset=0.0, duration=1.0, terms=("alpha",), text=None, **extra):
    d = {"id": cid, "audio": str(audio), "audio_offset": offset, "audio_duration": duration,
         "term_chunk_text": text or f"say {cid}", "term_chunk_audio_ground_truth_terms": list(terms)}
    d.update(extra)
    return d


def write_jsonl(path: Path, lines) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def run_stage1(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "stage1_extract", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def loud(seconds, sr=SR, channels=1, seed=0):
    x = (0.2 * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.fixture
def bad_audio(tmp_path):
    """One file per kind of bad audio a user meets, and two odd-but-good ones; {kind: (path, offset, duration)}."""
    d = tmp_path / "audio"
    d.mkdir()
    sf.write(d / "good.wav", loud(4.0), SR, subtype="PCM_16")
    sf.write(d / "rate8k.wav", loud(3.0, 8000), 8000, subtype="PCM_16")
    sf.write(d / "stereo44k.wav", loud(3.0, 44100, channels=2), 44100, subtype="PCM_16")
    (d / "zero.wav").write_bytes(b"")
    (d / "text.wav").write_text("these are notes, not audio\n" * 20)
    (d / "header.wav").write_bytes((d / "good.wav").read_bytes()[:30])        # cut inside the header
    (d / "short.wav").write_bytes((d / "good.wav").read_bytes()[:44 + 2 * SR])  # 1 s of a 4 s file
    nan = loud(2.0)
    nan[5000] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    inf = loud(2.0)
    inf[7000] = np.inf
    sf.write(d / "inf.wav", inf, SR, subtype="FLOAT")
    sf.write(d / "silent.wav", np.zeros(2 * SR, np.float32), SR, subtype="PCM_16")
    sf.write(d / "long.wav", loud(35.0), SR, subtype="PCM_16")
    return {
        "missing file": (d / "nope.wav", 0.0, 1.0, "audio file missing"),
        "zero-length file": (d / "zero.wav", 0.0, 1.0, "empty (0 bytes)"),
        "not audio": (d / "text.wav", 0.0, 1.0, "unreadable audio"),
        "truncated header": (d / "header.wav", 0.0, 1.0, "unreadable audio"),
        "truncated data": (d / "short.wav", 0.5, 2.0, "audio ends at 1.000s"),
        "NaN samples": (d / "nan.wav", 0.0, 1.0, "NaN or Inf"),
        "Inf samples": (d / "inf.wav", 0.0, 1.0, "NaN or Inf"),
        "silent chunk": (d / "silent.wav", 0.5, 1.0, "silent"),
        "offset past the end": (d / "good.wav", 9.0, 1.0, "outside the audio"),
        "longer than 30 s": (d / "long.wav", 0.0, None, "35.0s long: rejected"),
    }


def test_8k_and_44k_stereo_chunks_are_resampled_not_rejected(tmp_path, bad_audio):
    cfg = make_corpus(tmp_path, n_train=4, n_test=2)
    d = tmp_path / "audio"
    write_jsonl(tmp_path / "chunks/test.jsonl", [record("k8", d / "rate8k.wav", 0.5, 1.0),
                                                 record("k44", d / "stereo44k.wav", 1.0, 1.5),
                                                 record("k16", d / "good.wav", 0.5, 1.0)])
    stats = extract(cfg, backbone=FakeBackbone(), log=quiet)
    t = FeatureCache(tmp_path / "cache/features/demo").table("audio/test")
    assert stats["rejected"] == 0 and t.ids == ["k8", "k44", "k16"] and t.rejected() == []
    # FakeBackbone makes one frame per 20 ms of 16 kHz audio: the chunks arrived at 16 kHz, mono
    assert [len(t.item(i)) for i in range(3)] == [50, 75, 50]
    rms = t.item(0)[:, 1].astype(np.float32)  # per-frame std of the waveform: real signal, not silence
    assert rms.min() > 0.05


@pytest.mark.parametrize("kind", ["missing file", "zero-length file", "not audio", "truncated header",
                                  "truncated data", "NaN samples", "Inf samples", "silent chunk",
                                  "offset past the end", "longer than 30 s"])
def test_bad_audio_stops_naming_file_chunk_and_fix(tmp_path, bad_audio, kind):
    cfg = make_corpus(tmp_path, n_train=4, n_test=2)
    path, offset, duration, needle = bad_audio[kind]
    write_jsonl(tmp_path / "chunks/test.jsonl", [record("ok0", tmp_path / "audio/good.wav"),
                                                 record("bad1", path, offset, duration)])
    with pytest.raises(BadInput) as e:
        extract(cfg, backbone=FakeBackbone(), log=quiet)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "bad1" in msg, msg
    assert e.value.fix, msg                                  # and says what to do


def test_skip_bad_extract_totals_add_up_and_every_reason_is_recorded(tmp_path, bad_audio):
    """Bad manifest records and bad audio in one run: every one is in rejected.jsonl with its reason,
    nothing good is lost, and read = kept + rejected."""
    cfg = make_corpus(tmp_path, n_train=6, n_test=2)
    good = tmp_path / "audio/good.wav"
    audio_cases = {f"a{i}": case for i, case in enumerate(bad_audio.values())}
    lines = [record("g0", good, 0.0, 1.0), record("g1", tmp_path / "audio/rate8k.wav", 0.0, 2.0),
             record("g2", tmp_path / "audio/stereo44k.wav", 0.5, 2.0, terms=("Beta Gamma",))]
    lines += [record(cid, p, o, dur) for cid, (p, o, dur, _) in audio_cases.items()]
    manifest_cases = {
        len(lines) + 1: ("{not json", "invalid JSON"),
        len(lines) + 2: (record("m1", good, terms=()), "no terms and is not marked is_no_term_chunk"),
        len(lines) + 3: (record("m2", good, terms=("zelda",)), "'zelda' is not in the glossary"),
        len(lines) + 4: ({k: v for k, v in record("m3", good).items() if k != "term_chunk_text"},
                         "missing required field term_chunk_text"),
        len(lines) + 5: (record("g0", good, 1.0), "duplicate chunk id 'g0'"),
        len(lines) + 6: (record("m5", good, terms=("alpha",), is_no_term_chunk=True), "marked is_no_term_chunk"),
    }
    lines += [rec for rec, _ in manifest_cases.values()]
    lines.append(record("g3", good, 2.0, 1.5, terms=(), is_no_term_chunk=True))
    manifest = tmp_path / "chunks/test.jsonl"
    write_jsonl(manifest, lines)

    logs = []
    stats = extract(cfg, backbone=FakeBackbone(), skip_bad=True, log=logs.append)
    root = tmp_path / "cache/features/demo"
    cache = FeatureCache(root)
    assert cache.complete() and cache.verify() == []
    kept = cache.table("audio/test").ids
    assert kept == ["g0", "g1", "g2", "g3"]
    rejected = [json.loads(x) for x in (root / "rejected.jsonl").read_text().splitlines()]
    assert len(kept) + len(rejected) == len(lines)            # read = kept + rejected
    assert stats["rejected"] == len(audio_cases)
    # manifest records: file, line number and reason
    by_line = {r["record"]: r for r in rejected if r.get("file") == str(manifest)}
    assert set(by_line) == set(manifest_cases)
    for line, (_, needle) in manifest_cases.items():
        assert needle in by_line[line]["reason"], (line, by_line[line])
    # audio: chunk id and reason (with the file)
    by_id = {r["id"]: r for r in rejected if "id" in r}
    assert set(by_id) == set(audio_cases)
    for cid, (path, _, _, needle) in audio_cases.items():
        assert needle in by_id[cid]["reason"] and str(path) in by_id[cid]["reason"], by_id[cid]
    assert any("skipped chunk a0: " in m for m in logs)     # said as it happened, too
    # the train split (all good) is untouched by the test split's problems
    assert len(cache.table("audio/train")) == 6


# The values a hand-edited or scraped manifest carries that the reader once let through (or crashed
# on): each is refused by field name, with file and line, and --skip-bad records it like the others.
BAD_VALUES = {
    "duration NaN": (dict(audio_duration=float("nan")), "'audio_duration' is nan: give a finite number"),
    "duration 0": (dict(audio_duration=0), "'audio_duration' is 0: must be above 0"),
    "duration 1e9": (dict(audio_duration=1e9), "'audio_duration' is 1000000000.0: must be at most 600"),
    "duration as a string": (dict(audio_duration="2"), "'audio_duration' is '2': give a number without quotes"),
    "offset true": (dict(audio_offset=True), "'audio_offset' is True: give a number, not true/false"),
    "offset -1": (dict(audio_offset=-1), "'audio_offset' is -1: must be at least 0"),
    "terms as a string": (dict(term_chunk_audio_ground_truth_terms="alpha"),
                          'give a list of strings: ["alpha"] for one'),
    "terms holding a number": (dict(term_chunk_audio_ground_truth_terms=["alpha", 3]), "give a list of strings"),
    "term span reversed": (dict(term_start_time=1.5, term_end_time=0.5),
                           "'term_end_time' is 0.5: ends before term_start_time (1.5)"),
    "no-term flag as a string": (dict(is_no_term_chunk="false"), "give true or false"),
    "text as a number": (dict(term_chunk_text=5), "'term_chunk_text' is 5: give a string"),
    "offset Infinity": ('"audio_offset": Infinity', "'audio_offset' is inf: give a finite number"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_field_values_are_refused_by_name_and_skippable(tmp_path, case):
    cfg = make_corpus(tmp_path, n_train=4, n_test=2)
    good = tmp_path / "good.wav"
    sf.write(good, loud(4.0), SR, subtype="PCM_16")
    change, needle = BAD_VALUES[case]
    if isinstance(change, dict):
        bad = json.dumps(record("bad", good, **{k: v for k, v in change.items()
                                                if k not in ("audio_duration", "audio_offset")}))
        for k in ("audio_duration", "audio_offset"):           # json.dumps writes NaN as NaN, as Python reads it
            if k in change:
                bad = bad.replace(f'"{k}": ' + json.dumps(record("x", good)[k]), f'"{k}": ' + json.dumps(change[k]))
    else:
        bad = json.dumps(record("bad", good)).replace('"audio_offset": 0.0', change)
    manifest = tmp_path / "chunks/test.jsonl"
    write_jsonl(manifest, [record("g0", good), bad, record("g1", good, 1.0)])
    with pytest.raises(BadInput) as e:
        extract(cfg, backbone=FakeBackbone(), log=quiet)
    assert needle in str(e.value) and f"{manifest}, line 2:" in str(e.value) and "--skip-bad" in str(e.value)
    extract(cfg, backbone=FakeBackbone(), skip_bad=True, log=quiet)
    root = tmp_path / "cache/features/demo"
    assert FeatureCache(root).table("audio/test").ids == ["g0", "g1"]
    (rejected,) = [json.loads(x) for x in (root / "rejected.jsonl").read_text().splitlines()]
    assert rejected["record"] == 2 and needle in rejected["reason"]


def test_empty_split_and_all_bad_split_stop(tmp_path):
    cfg = make_corpus(tmp_path, n_train=4, n_test=2)
    manifest = tmp_path / "chunks/test.jsonl"
    manifest.write_text("")
    with pytest.raises(BadInput, match="split 'test' is empty") as e:
        extract(cfg, backbone=FakeBackbone(), log=quiet)
    assert str(manifest) in str(e.value)
    # with --skip-bad a split whose every record is rejected is still an empty split, never an empty table
    write_jsonl(manifest, ["{broken", record("x", tmp_path / "long.wav", terms=("zelda",))])
    with pytest.raises(BadInput, match="split 'test' is empty"):
        extract(cfg, backbone=FakeBackbone(), skip_bad=True, log=quiet)
    assert not (tmp_path / "cache/features/demo/tables").exists()


# ---------------------------------------------------------------- the CLI: exit code 2 and the message


def _cli_corpus(tmp_path):
    cfg = make_corpus(tmp_path, n_train=4, n_test=2)
    sets = ["--set", f"data.glossary={cfg.data.glossary}", "--set", "data.alt2main=",
            "--set", f"data.chunks={cfg.data.chunks}", "--set", f"cache.root={cfg.cache.root}"]
    return cfg, sets


def _break_manifest(tmp_path, kind):
    m = tmp_path / "chunks/test.jsonl"
    lines = m.read_text().splitlines()
    if kind == "invalid JSON line":
        lines.insert(1, '{"id": "x", "audio": ')
        m.write_text("\n".join(lines) + "\n")
        return m, ["line 2: invalid JSON", "--skip-bad"]
    if kind == "non-UTF-8 bytes":
        m.write_bytes(m.read_bytes() + b'{"id": "\xff\xfe"}\n')
        return m, ["non-UTF-8 bytes at line 3", "re-encode"]
    if kind == "empty split":
        m.write_text("")
        return m, ["split 'test' is empty"]
    if kind == "alias cycle":
        a = tmp_path / "alt2main.json"
        a.write_text(json.dumps({"alfa": "alpha", "delta": "delta force", "delta force": "delta"}))
        return a, ["alias cycle: delta -> delta force -> delta", "point every alias"]
    raise AssertionError(kind)


def stage1_cli(args, capsys, monkeypatch, in_process=True):
    """(exit code, stderr) of `python -m stage1_extract ARGS`; in-process runs the same entry point
    (stage1_extract.cli.main) without paying for a new interpreter."""
    if not in_process:
        p = run_stage1(*args)
        return p.returncode, p.stderr
    from stage1_extract.cli import main
    return _run_cli_inprocess(main, ["stage1_extract", *args], capsys, monkeypatch)


def _run_cli_inprocess(main, argv, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["invalid JSON line", "non-UTF-8 bytes", "empty split", "alias cycle"])
def test_extract_cli_bad_manifest_exit_2(tmp_path, kind, capsys, monkeypatch):
    cfg, sets = _cli_corpus(tmp_path)
    bad_file, needles = _break_manifest(tmp_path, kind)
    if kind == "alias cycle":
        sets += ["--set", f"data.alt2main={bad_file}"]
    code, err = stage1_cli(["extract", *sets], capsys, monkeypatch, in_process=kind != "invalid JSON line")
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert str(bad_file) in err, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("args,needles", [
    (["--set", "extract.shard_sise=8"], ["unknown config key 'extract.shard_sise'", "shard_size"]),
    (["--set", "extract.shard_size=big"], ["config key 'extract.shard_size' expects int", "'big'"]),
    (["--config", "{tmp}/bad.toml"], ["{tmp}/bad.toml", "config key 'cache.dtype' expects str, got int 16"]),
    (["--config", "{tmp}/nope.toml"], ["{tmp}/nope.toml", "config file does not exist"]),
    (["--set", "data.chunks={tmp}/no-such-dir"], ["{tmp}/no-such-dir", "no chunk manifests", "run `python -m stage1_extract prepare`"]),
    (["--set", "data.glossary={tmp}/no-glossary.json"], ["{tmp}/no-glossary.json", "glossary file does not exist", "data.glossary"]),
    (["--set", "cache.format=parquet"], ["unknown cache format 'parquet'", "cache.format"]),
])
def test_extract_cli_bad_config_exit_2(tmp_path, args, needles, capsys, monkeypatch):
    _, sets = _cli_corpus(tmp_path)
    (tmp_path / "bad.toml").write_text("[cache]\ndtype = 16\n")
    code, err = stage1_cli(["extract", *sets, *[a.format(tmp=tmp_path) for a in args]], capsys, monkeypatch,
                           in_process=args[1] != "extract.shard_sise=8")
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n.format(tmp=tmp_path) in err, err


def test_train_and_eval_cli_bad_config_exit_2(tmp_path, capsys, monkeypatch):
    """The other stages' commands share the same handling (in-process: their imports are slow)."""
    from shared.cli import run_cli
    from stage2_train.train import train_command
    from stage3_index.cli import cli as eval_cli
    code, err = _run_cli_inprocess(lambda: run_cli(train_command),
                                   ["stage2_train", "--set", "train.epochs=ten"], capsys, monkeypatch)
    assert code == 2 and "config key 'train.epochs' expects int, got 'ten'" in err
    code, err = _run_cli_inprocess(lambda: run_cli(train_command),
                                   ["stage2_train", "--features", str(tmp_path / "nowhere"),
                                    "--run", str(tmp_path / "run")], capsys, monkeypatch)
    assert code == 2 and f"{tmp_path / 'nowhere'}: no feature cache here" in err
    code, err = _run_cli_inprocess(lambda: run_cli(eval_cli),
                                   ["stage3_index", "eval", "--run", str(tmp_path / "norun")], capsys, monkeypatch)
    assert code == 2 and "run folder does not exist" in err and str(tmp_path / "norun") in err
    (tmp_path / "norun").mkdir()
    code, err = _run_cli_inprocess(lambda: run_cli(eval_cli),
                                   ["stage3_index", "eval", "--run", str(tmp_path / "norun")], capsys, monkeypatch)
    assert code == 2 and "no checkpoint (best.pt or last.pt)" in err and str(tmp_path / "norun") in err


def test_bad_backbone_settings_are_config_errors(tmp_path):
    """A backbone value that cannot work is a BadInput naming it (exit 2), not a traceback."""
    cfg = make_corpus(tmp_path, n_train=4, n_test=2)
    cfg.backbone.kind = "whisper"
    with pytest.raises(BadInput, match="kind 'whisper' is not 'embedded' or 'qwen2audio'") as e:
        extract(cfg, log=quiet)
    assert "backbone" in str(e.value)
    cfg.backbone.kind, cfg.backbone.audio_model, cfg.cache.name = "qwen2audio", str(tmp_path / "no-model"), "b"
    with pytest.raises(BadInput, match="model folder does not exist") as e:
        extract(cfg, log=quiet)
    assert str(tmp_path / "no-model") in str(e.value)


# ---------------------------------------------------------------- prepare: TextGrids and segments


def test_prepare_skip_bad_records_every_segment_problem(tmp_path):
    """Every kind of bad segment at once: each goes to rejected.jsonl with its kind and reason, the
    good segment's chunks are exactly what they are without the bad ones, read = kept + rejected."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "long.wav", loud(12.0), SR, subtype="PCM_16")
    (audio / "empty.wav").write_bytes(b"")
    ali = tmp_path / "ali"
    ali.mkdir()
    good_words = [(0.2, 0.6, "we"), (0.6, 1.2, "kubernetes"), (1.2, 1.5, "now"), (1.5, 1.9, "and"),
                  (2.0, 2.4, "then"), (2.4, 2.8, "later"), (3.0, 3.3, "more"), (3.3, 3.9, "words")]
    (ali / "good.TextGrid").write_text(textgrid(good_words, 4.0))
    (ali / "notier.TextGrid").write_text(textgrid([(0.1, 0.5, "kubernetes")], 2.0, tier="phones"))
    (ali / "overlap.TextGrid").write_text(textgrid([(0.1, 0.5, "hi"), (0.4, 0.9, "kubernetes")], 2.0))
    (ali / "pastend.TextGrid").write_text(textgrid([(0.1, 0.5, "hi"), (0.5, 2.9, "kubernetes")], 3.0))
    (ali / "garbage.TextGrid").write_text("not a textgrid")
    for sid in ("offset", "noaudio", "emptyaudio", "shortaudio"):
        (ali / f"{sid}.TextGrid").write_text(textgrid([(0.1, 0.5, "kubernetes")], 1.0))
    rows = [("good", f"audio/long.wav:0:{4 * SR}"), ("notier", f"audio/long.wav:{4 * SR}:{2 * SR}"),
            ("overlap", f"audio/long.wav:{6 * SR}:{2 * SR}"), ("pastend", f"audio/long.wav:{8 * SR}:{2 * SR}"),
            ("garbage", f"audio/long.wav:{10 * SR}:{2 * SR}"), ("nogrid", f"audio/long.wav:0:{SR}"),
            ("offset", f"audio/long.wav:{20 * SR}:{SR}"), ("noaudio", "audio/missing.wav"),
            ("emptyaudio", "audio/empty.wav"), ("shortaudio", f"audio/long.wav:{11 * SR}:{3 * SR}")]
    segs = tmp_path / "segments.tsv"
    segs.write_text("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\n" +
                    "".join(f"{sid}\t{a}\t0\tspk\tx\ten\n" for sid, a in rows))
    (tmp_path / "glossary.txt").write_text("Kubernetes\n")
    expect = {"notier": "no 'words' tier", "overlap": "overlapping", "pastend": "past the segment",
              "garbage": "malformed TextGrid", "nogrid": "TextGrid missing", "offset": "past the end",
              "noaudio": "audio file missing", "emptyaudio": "empty", "shortaudio": "before the segment"}

    with pytest.raises(BadInput) as e:                          # default: the first bad segment stops
        prepare(segs, ali, tmp_path / "glossary.txt", tmp_path / "stop", log=quiet)
    assert "notier.TextGrid" in str(e.value) and "no 'words' tier" in str(e.value)
    assert not (tmp_path / "stop/chunks.jsonl").exists()

    out = tmp_path / "out"
    summary = prepare(segs, ali, tmp_path / "glossary.txt", out, skip_bad=True, noterm_ratio=0, log=quiet)
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert summary["segments_read"] == len(rows) == 1 + len(rejected) == 1 + summary["rejected"]
    assert summary["segments_skipped"] == {v: 1 for v in expect.values()}
    reasons = {r["segment_id"]: r for r in rejected}
    assert set(reasons) == set(expect)
    for sid, needle in expect.items():
        assert needle in reasons[sid]["reason"], reasons[sid]
        assert reasons[sid]["file"], reasons[sid]                # the file to fix is named
    assert reasons["notier"]["file"].endswith("notier.TextGrid")
    assert reasons["noaudio"]["file"].endswith("missing.wav")
    # the good segment's chunks are the same as when the bad segments are not there at all
    segs_good = tmp_path / "good.tsv"
    segs_good.write_text(segs.read_text().splitlines()[0] + "\n" + segs.read_text().splitlines()[1] + "\n")
    prepare(segs_good, ali, tmp_path / "glossary.txt", tmp_path / "alone", noterm_ratio=0, log=quiet)
    assert (out / "chunks.jsonl").read_text() == (tmp_path / "alone/chunks.jsonl").read_text()
    assert "kubernetes" in (out / "chunks.jsonl").read_text()


def test_prepare_cli_bad_segments_exit_2(tmp_path):
    segs = tmp_path / "segments.tsv"
    segs.write_text("id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang\ns1\tonly-two\n")
    (tmp_path / "g.txt").write_text("alpha\n")
    p = run_stage1("prepare", "--segments", str(segs), "--alignments", str(tmp_path), "--glossary",
                   str(tmp_path / "g.txt"), "--alt2main", "", "--out", str(tmp_path / "out"), "--split-by", "none")
    assert p.returncode == 2 and f"{segs}, line 2: expected 6 tab-separated columns" in p.stderr, p.stderr
    p = run_stage1("prepare", "--segments", str(tmp_path / "none.tsv"), "--alignments", str(tmp_path),
                   "--glossary", str(tmp_path / "g.txt"), "--alt2main", "", "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and "segments file does not exist" in p.stderr and "none.tsv" in p.stderr


def test_training_a_cache_without_a_train_split_says_how_to_make_one(tmp_path):
    """`prepare --split-by none` gives one split ('all' or --split-name): trainable only after a re-split."""
    import json as _json

    from stage2_train.train import train
    from tests.synthetic import build_cache
    from tests.test_train import cfg_for
    features = build_cache(tmp_path, n_terms=10, n_train=16, n_dev=8, n_test=8)
    idx = _json.loads((features / "index.json").read_text())
    idx["tables"] = {("audio/all" if k == "audio/train" else k): v for k, v in idx["tables"].items()}
    (features / "index.json").write_text(_json.dumps(idx))
    (features / "tables" / "audio" / "train").rename(features / "tables" / "audio" / "all")
    with pytest.raises(BadInput, match=r"no train split \(it has: all, dev, test\).*--split-by speaker or ratio"):
        train(cfg_for(), features, tmp_path / "run", log=lambda *_: None)
