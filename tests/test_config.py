import pytest

from shared.config import config_from_dict, diff_configs, load_config
from shared.errors import BadInput


def test_defaults_file_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nlr = 0.01\nepochs = 3\n[loss]\nw_term = 0.5\n[eval]\nks = [1, 3]\n')
    cfg = load_config(p, ["train.lr=3e-4", "train.learn_temperature=false", "eval.glossary_sizes=100,200"])
    assert cfg.train.lr == pytest.approx(3e-4)      # --set beats the file
    assert cfg.train.epochs == 3                    # the file beats defaults
    assert cfg.loss.w_term == 0.5 and cfg.loss.w_text == 0.3
    assert cfg.train.learn_temperature is False
    assert cfg.eval.ks == [1, 3] and cfg.eval.glossary_sizes == [100, 200]


def test_int_in_toml_is_accepted_for_float():
    cfg = load_config(None, ["loss.w_term=1"])
    assert cfg.loss.w_term == 1.0 and isinstance(cfg.loss.w_term, float)


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("trian.lr=1", "unknown config section 'trian'"),
    ("train.epochs=abc", "'train.epochs' expects int"),
    ("train.learn_temperature=maybe", "'train.learn_temperature' expects bool"),
    ("train.lr", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(BadInput, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_bad_toml_types_and_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nepochs = "ten"\n')
    with pytest.raises(BadInput, match="train.epochs") as e:
        load_config(p)
    assert str(p) in str(e.value)
    p.write_text('[train]\nbogus = 1\n')
    with pytest.raises(BadInput, match="unknown config key 'train.bogus'"):
        load_config(p)
    with pytest.raises(BadInput, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_roundtrip_and_diff():
    a = load_config(None, ["loss.w_term=0.9"])
    b = config_from_dict(a.to_dict())
    assert b == a
    d = diff_configs(load_config().to_dict(), a.to_dict())
    assert d == {"loss.w_term": (0.7, 0.9)}


def test_shipped_configs_load():
    from pathlib import Path
    configs = sorted(Path(__file__).resolve().parent.parent.glob("configs/*.toml"))
    assert len(configs) >= 2
    for p in configs:
        load_config(p)


def test_every_config_key_is_read_somewhere():
    """A key no code reads is a promise the tool does not keep: each field of each section is read as an
    attribute (`cfg.train.lr`, `t.lr`) or named as a string somewhere outside config.py."""
    import dataclasses
    import re
    from pathlib import Path

    from shared.config import Config
    root = Path(__file__).resolve().parents[1]
    code = "\n".join(p.read_text(encoding="utf-8") for pkg in ("shared", "stage1_extract", "stage2_train",
                                                              "stage3_index", "demo", "termret", "bench")
                     for p in (root / pkg).rglob("*.py") if p.name != "config.py")
    unread = [f"{sec.name}.{f.name}" for sec in dataclasses.fields(Config)
              for f in dataclasses.fields(sec.type if isinstance(sec.type, type) else type(getattr(Config(), sec.name)))
              if not re.search(rf"\.{f.name}\b|[\"']{f.name}[\"']", code)]
    assert unread == []


def test_retired_keys_are_skipped_in_saved_configs_and_refused_when_set():
    from shared.config import config_from_dict
    cfg = config_from_dict({"train": {"reject_k": 16, "lr": 0.5}})
    assert cfg.train.lr == 0.5 and not hasattr(cfg.train, "reject_k")
    with pytest.raises(BadInput, match="unknown config key 'train.reject_k'"):
        load_config(None, ["train.reject_k=3"])


def test_renamed_keys_of_saved_configs_are_read_under_their_new_name():
    from shared.config import config_from_dict
    assert config_from_dict({"train": {"dedup_terms": False}}).train.term_cap == 0
    assert config_from_dict({"train": {"dedup_terms": True}}).train.term_cap == 1
