"""Training curves: curves.png beside metrics.jsonl at each evaluation, TensorBoard scalars when asked for,
dev curves of several runs overlaid by compare."""
import sys
import types

import pytest

from stage2_train import curves
from stage2_train.train import train
from stage3_index.compare import compare
from tests.synthetic import build_cache
from tests.test_train import cfg_for


def quiet(*_):
    pass


def test_read_metrics_splits_steps_and_evals_and_skips_a_torn_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"type": "step", "step": 1, "total": 2.0}\n{"type": "eval", "step": 1, "dev_r5": 0.5}\n'
                 '{"type": "step", "step": 2, "tot')
    steps, evals = curves.read_metrics(p)
    assert [s["step"] for s in steps] == [1] and evals == [{"type": "eval", "step": 1, "dev_r5": 0.5}]
    assert curves.read_metrics(tmp_path / "none.jsonl") == ([], [])
    assert curves.plot_run(tmp_path / "empty") is None


def test_smooth_is_a_trailing_mean():
    assert curves.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert curves.smooth([4.0, 2.0], 1) == [4.0, 2.0]


class FakeWriter:
    made = []

    def __init__(self, logdir):
        self.logdir, self.scalars, self.closed = logdir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("curves"), n_terms=20, n_train=64, n_dev=16, n_test=16)


def test_a_run_draws_its_curves_and_logs_to_tensorboard(features, tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeWriter.made.clear()
    tr = train(cfg_for(**{"train.epochs": 2, "train.tensorboard": "true"}), features, tmp_path / "a", log=quiet)
    png = tmp_path / "a" / "curves.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    (w,) = FakeWriter.made
    assert w.logdir == str(tmp_path / "a" / "tensorboard") and w.closed
    tags = {t for t, _, _ in w.scalars}
    assert {"train/total", "dev/dev_r5"} <= tags
    dev_steps = [s for t, _, s in w.scalars if t == "dev/dev_r5"]
    steps, evals = curves.read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert dev_steps == [e["step"] for e in evals] and len(evals) == 2
    assert len([1 for t, _, _ in w.scalars if t == "train/total"]) == len(steps) == tr.state["step"]


def test_tensorboard_off_or_missing_writes_nothing(features, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails: not installed
    said = []
    train(cfg_for(**{"train.epochs": 1, "train.tensorboard": "true"}), features, tmp_path / "b", log=said.append)
    assert any("tensorboard package is not installed" in m for m in said)
    assert not (tmp_path / "b" / "tensorboard").exists() and (tmp_path / "b" / "curves.png").is_file()


def test_compare_overlays_dev_curves(features, tmp_path):
    for name, w in (("x", 0.5), ("y", 0.9)):
        train(cfg_for(**{"train.epochs": 2, "loss.w_term": w}), features, tmp_path / name, log=quiet)
    compare([tmp_path / "x", tmp_path / "y"], tmp_path / "cmp", log=quiet)
    png = tmp_path / "cmp" / "dev_curves.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
