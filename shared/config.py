"""The one typed configuration every stage reads.

Plain dataclasses with defaults (nanoGPT style: values, not a framework). A TOML file overrides
the defaults (`--config configs/demo.toml`), then `--set section.key=value` overrides the file.
Unknown keys and values of the wrong type are errors that name the key. Every stage writes the
resolved config beside its outputs (`save_config`), so a run can always be reproduced.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from shared.atomic import write_text_atomic
from shared.errors import BadInput


@dataclass
class DataConfig:
    """Where the users' inputs are and how `prepare` cuts them into term chunks."""
    segments: str = "cache/demo/corpus/segments.tsv"
    alignments: str = "cache/demo/corpus/alignments"
    glossary: str = "cache/demo/corpus/glossary.json"
    alt2main: str = "cache/demo/corpus/alt2main.json"
    chunks: str = "cache/demo/chunks"          # folder of {train,dev,test}.jsonl manifests
    context: float = 1.0                       # seconds of context each side of a term
    noterm_ratio: float = 0.1                  # no-term chunks per term chunk
    noterm_length: str = "match"               # "match": each no-term chunk as long as a term chunk of
                                               # its split drawn at random (length tells nothing);
                                               # "band": uniform in noterm_min..noterm_max seconds
    noterm_min: float = 2.5                    # the band (also where "match" draws with no term chunk)
    noterm_max: float = 4.0
    max_ngram: int = 5
    split_by: str = "speaker"                  # "speaker" | "ratio" | "none"
    split_name: str = ""                       # split_by "none": the one split's name (<name>.jsonl),
                                               # e.g. "heldout"; "" = chunks.jsonl, split "all"
    dev_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 0
    text_field: str = "term"                   # glossary field the text side embeds (seed's text_field)
    distractors: str = ""                      # eval's glossary-size padding: "builtin" (place and person
                                               # names, shared/distractors.py), a file of terms, or "" (none)
    n_distractors: int = 10000                 # how many distractors stage 1 embeds (table text/distractors)
    # pseudo-terms (stage1_extract/pseudo.py): non-glossary words/n-grams of TRAIN transcripts as extra
    # targets, each with a chunk cut like a term chunk; no word of any glossary form ever becomes one
    pseudo_ratio: float = 0.0                  # pseudo chunks per term chunk in train; 0 = off
    pseudo_max_ngram: int = 2                  # unigrams .. n-grams
    pseudo_min_letters: int = 4                # letters a pseudo-term has at least
    pseudo_length_power: float = 1.0           # sampling weight = letters ** power (0 = uniform)
    pseudo_max_per_term: int = 5               # chunks per pseudo-term at most (0 = no cap)
    pseudo_term_free: bool = True              # drop pseudo chunks that overlap a glossary term's words
    pseudo_exclude: str = ""                   # extra term lists (comma-separated files, any glossary
                                               # format) whose words never become pseudo-terms


@dataclass
class BackboneConfig:
    """Which frozen models stage 1 runs, and where the taps sit."""
    kind: str = "embedded"                     # "embedded" (Whisper tiny.en + MiniLM) | "qwen2audio"
    audio_model: str = ""                      # "" = cache/models/whisper-tiny-en-qwen2audio (embedded) /
                                               #      Qwen/Qwen2-Audio-7B-Instruct (qwen2audio); or a local path
    text_model: str = ""                       # "" = the packaged MiniLM (embedded) / same checkpoint (qwen2audio)
    revision: str = ""
    audio_source: str = "tower"                # "tower" | "lm" (LM states over audio tokens, as the seed)
    audio_unfreeze: int = 1                    # top audio layers trained in stage 2 (tap = input of layer L-N)
    text_unfreeze: int = 0
    text_prompt: str = "{text}"
    device: str = "cpu"
    dtype: str = ""                            # "" = bfloat16 on GPU, float32 on CPU


@dataclass
class TextConfig:
    """What the text side is made of (see shared/heads.TextSide): "lm" (the frozen LM's states: what a
    term means), "chars" (its spelling), "phones" (its pronunciation from the G2P). Form parts find
    terms never seen in training; the LM part alone cannot (README, ablation)."""
    encoders: list[str] = field(default_factory=lambda: ["chars", "phones"])
    g2p: str = "espeak"                        # "espeak" (GPL-3.0 eSpeak NG) | "none" (no phones)
    buckets: int = 65536                       # hashed n-gram table size
    bag_dim: int = 256
    ngram_max: int = 4                         # character / phone n-grams of length 1..ngram_max
    gram_dropout: float = 0.0                  # training: share of a text's n-gram ids dropped per step


@dataclass
class ExtractConfig:
    batch_seconds: float = 120.0               # audio seconds per batch (duration-bucketed batches)
    text_batch: int = 256
    shard_size: int = 512                      # chunks per shard: the unit of resume and scale-out
    max_chunk_seconds: float = 30.0            # the tower has 1500 positions: longer chunks are rejected
    limit: int = 0                             # 0 = all; N = first N chunks per split (seed's quick mode)
    threads: int = 0                           # CPU threads for torch; 0 = torch's default
    # `transcribe` (the cascade baseline's ASR, stage1_extract/transcribe.py)
    asr_mode: str = "window30"                 # Whisper decoding: "window30" (each chunk in the 30 s window,
                                               # what users get) | "fast" (batch longest + 1 s, ~20x less CPU)
    asr_every: int = 1                         # transcribe one chunk in k of a split only (a fixed subset;
                                               # eval scores the cascade and ours on it); 1 = all


@dataclass
class CacheConfig:
    root: str = "cache"
    name: str = "demo"                         # cache/features/NAME
    format: str = "zarr"                       # "zarr" | "hdf5"
    dtype: str = "float16"


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    top_lr: float = 1e-4                       # learning rate of the unfrozen top layers
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    proj_dim: int = 512
    pooling: str = "mean"                      # "mean" | "attentive"
    pool_heads: int = 1                        # attentive pooling queries (outputs concatenated)
    head: str = "linear"                       # projection head: "linear" | "mlp"
    temperature: float = 0.07
    learn_temperature: bool = True
    eval_every: int = 0                        # steps; 0 = once per epoch
    patience: int = 3                          # evaluations without dev R@5 gain before stopping
    tensorboard: bool = False                  # scalars to RUN/tensorboard too (needs the tensorboard package)
    seed: int = 0
    term_cap: int = 1                          # sampler: at most this many chunks of one term per batch
                                               # (where the term's frequency allows; 0 = no cap)
    augment_speed: float = 0.0                 # cached-frame augmentation (stage2_train/augment.py): speed
    augment_mask: float = 0.0                  # change +-, share of frames masked in one span,
    augment_noise: float = 0.0                 # noise std relative to each feature's spread; 0 = off
    pseudo_epochs: int = 0                     # pseudo-term chunks (prepare's data.pseudo_ratio) take part in
                                               # the first N epochs only (curriculum); 0 = in every epoch
    hard_k: int = 8                            # mined hard negatives per chunk
    hard_refresh: int = 100                    # steps between hard-negative refreshes
    mine_index: str = "auto"                   # FAISS factory string the negatives are searched in; "auto" =
                                               # exact below 20,000 glossary rows, a grouped IVF search above (mining.py:ListSearch)
    hard_exclude_top: int = 0                  # skip the N best non-positive candidates (likeliest unlabelled synonyms)
    hard_max_score: float = 1.0                # drop candidates scoring above this cosine (1.0 = off)
    hard_margin: float = -1.0                  # drop candidates scoring above (best positive - margin); < 0 = off
    mine_from: str = "train"                   # glossary rows hard negatives come from: "train" (terms of the
                                               # train split only: no dev/test term's form is ever seen in
                                               # training, as with a glossary known only at test time) or "all".
                                               # "all" pushes audio away from every unseen term's form, always a
                                               # negative: unseen R@10 0.70 vs 0.82 with "train" (README)
    in_memory: str = "auto"                    # "auto" | "yes" | "no"
    limit: int = 0
    device: str = "auto"
    threads: int = 0                           # CPU threads for torch; 0 = torch's default (the demo's
                                               # text side: 0.13 s/step on 2 threads, 0.18 on 1)


@dataclass
class LossConfig:
    w_text: float = 0.3
    w_term: float = 0.7
    w_reject: float = 0.2
    w_hard: float = 0.2
    reject_margin: float = 0.3


@dataclass
class EvalConfig:
    split: str = "test"
    index: str = "Flat"                        # FAISS index_factory string
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    glossary_sizes: list[int] = field(default_factory=lambda: [1000, 10000])
    keep_hits: float = 0.9                     # threshold keeps this share of dev top-1 hits
    # "ours + transcript": audio score + w * the cascade's fuzzy score, w picked on the run's dev split
    # among these (needs transcripts of dev and of the evaluated split); [] = not reported
    fusion_weights: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    cascade_scorer: str = "words+phones"       # the cascade baseline's fuzzy match (stage3_index/cascade.py SCORERS)
    window: float = 1.92                       # streaming retriever
    hop: float = 0.96
    min_votes: int = 1


@dataclass
class SecondConfig:
    """The second stage (shared/second_stage.py, stage2_train/second.py): the first stage's top_n rows of a
    window re-scored by matching each form's tokens to the window's frames, trained on the cache after the
    first stage (RUN/second.pt). Its fused score is what the accept threshold reads when it is on."""
    enabled: bool = False
    top_n: int = 50                            # first-stage rows re-scored per window (query time, dev)
    train_top_n: int = 20                      # first-stage rows among each train chunk's candidates
    tokens: str = "phones"                     # "phones" (IPA characters) | "chars" (letters) | "both"
    match: str = "monotonic"                   # "monotonic" (tokens in order) | "maxsim" (order-free) | "both"
    dim: int = 128
    max_tokens: int = 64                       # tokens of a form at most
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    sound_k: int = 0                           # extra train candidates: the k glossary rows nearest to each
                                               # positive by edit distance of the pronunciation (spelling
                                               # without phones), besides the first stage's train_top_n
    distractors: int = 10                      # the first stage's top k distractor names (data.distractors:
                                               # real names no chunk says) among each train chunk's candidates;
                                               # the mix is then fitted on dev lists from the glossary padded
                                               # with all of them. 0 = neither
    reject: float = 1.0                        # weight of dev's no-term chunks in the mix fit (a "none of them"
                                               # candidate of score 0 in every list; 0 = off): dev AUROC
                                               # .984 -> .993, at 10,000 terms .967 -> .984
    mix_on: str = "dev"                        # where the mix of cosine and matching scores is fitted: "train"
                                               # (with the encoders, the cosine an input) or "dev" (the encoders
                                               # learn from matching alone, the mix is fitted on dev after: on
                                               # train chunks the first stage memorised, the cosine over-explains)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextConfig = field(default_factory=TextConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    second: SecondConfig = field(default_factory=SecondConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, key: str, source: str):
    """Check `value` against the dataclass field type; strings from --set are parsed first."""
    origin = typing.get_origin(typ)
    if isinstance(value, str) and typ is not str and origin is None:
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(text)
            return typ(text)
        except ValueError:
            raise BadInput(f"config key '{key}' expects {typ.__name__}, got {value!r}", file=source,
                           fix=f"give a {typ.__name__} value") from None
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, list):
            raise BadInput(f"config key '{key}' expects a list, got {value!r}", file=source)
        return [_coerce(v, item, key, source) for v in value]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise BadInput(f"config key '{key}' expects {typ.__name__}, got {type(value).__name__} {value!r}",
                       file=source, fix=f"give a {typ.__name__} value")
    return value


# Ranges of the numeric keys (checked wherever a config is read: TOML, --set, a saved run's config).
# Every number must be finite; by default at least 0. Keys below: strictly positive, within [0, 1],
# or free in sign (a seed; hard_margin < 0 means "off").
POSITIVE = {"data.noterm_min", "data.noterm_max", "data.max_ngram", "data.pseudo_max_ngram", "text.buckets",
            "text.bag_dim", "text.ngram_max", "extract.batch_seconds", "extract.text_batch", "extract.shard_size",
            "extract.max_chunk_seconds", "train.epochs", "train.batch_size", "train.lr", "train.proj_dim",
            "train.pool_heads", "train.temperature", "train.hard_refresh", "eval.window", "eval.hop",
            "extract.asr_every", "eval.min_votes", "second.top_n", "second.train_top_n", "second.dim",
            "second.max_tokens", "second.epochs", "second.batch_size", "second.lr"}
UNIT = {"data.dev_ratio", "data.test_ratio", "text.gram_dropout", "eval.keep_hits", "train.augment_mask"}
SIGNED = {"data.seed", "train.seed", "train.hard_margin", "train.hard_max_score"}


def _check_range(key: str, value, source: str) -> None:
    if isinstance(value, list):
        for v in value:
            _check_range(key, v, source)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise BadInput(f"config key '{key}' is {value}", file=source, fix="give a finite number")
    if key in SIGNED:
        return
    if key in POSITIVE and value <= 0:
        raise BadInput(f"config key '{key}' is {value}: must be above 0", file=source, fix="give a positive number")
    if value < 0:
        raise BadInput(f"config key '{key}' is {value}: must be at least 0", file=source, fix="give 0 or more")
    if key in UNIT and value > 1:
        raise BadInput(f"config key '{key}' is {value}: a fraction, at most 1", file=source, fix="give 0 to 1")


def _section_types(section) -> dict:
    return typing.get_type_hints(type(section))


def _apply(cfg: Config, key: str, value, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise BadInput(f"config key '{key}' must look like section.key (e.g. train.lr)", file=source)
    sec_name, name = parts
    sections = {f.name for f in dataclasses.fields(Config)}
    if sec_name not in sections:
        raise BadInput(f"unknown config section '{sec_name}' in key '{key}'", file=source,
                       fix=f"sections are: {', '.join(sorted(sections))}")
    section = getattr(cfg, sec_name)
    types_ = _section_types(section)
    if name not in types_:
        raise BadInput(f"unknown config key '{key}'", file=source,
                       fix=f"keys of [{sec_name}] are: {', '.join(types_)}")
    value = _coerce(value, types_[name], key, source)
    _check_range(key, value, source)
    setattr(section, name, value)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                base: Config | None = None) -> Config:
    """Defaults (or a copy of `base`, e.g. a run's saved config), then the TOML file, then
    `key=value` overrides (in that order)."""
    import copy
    cfg = copy.deepcopy(base) if base is not None else Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise BadInput("config file does not exist", file=path, fix="check the --config path")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise BadInput(f"not valid TOML: {e}", file=path) from None
        for sec_name, values in data.items():
            if not isinstance(values, dict):
                raise BadInput(f"top-level key '{sec_name}' must be a [section]", file=path)
            for name, value in values.items():
                _apply(cfg, f"{sec_name}.{name}", value, str(path))
    for item in overrides:
        if "=" not in item:
            raise BadInput(f"override {item!r} must look like section.key=value", file="--set")
        key, value = item.split("=", 1)
        _apply(cfg, key.strip(), value, "--set")
    return cfg


# keys older runs saved that no code reads any more: ignored when a saved config is read (the
# rejection hinge runs on the mined hard negatives, train.hard_k of them)
RETIRED_KEYS = {"train.reject_k"}
# keys older runs saved under another name: (new key, value in the new key's terms)
RENAMED_KEYS = {"train.dedup_terms": ("train.term_cap", lambda on: 1 if on else 0)}


def config_from_dict(data: dict) -> Config:
    """A config saved by a run (config.json, a checkpoint); retired keys are skipped."""
    cfg = Config()
    for sec_name, values in data.items():
        for name, value in values.items():
            key = f"{sec_name}.{name}"
            if key in RENAMED_KEYS:
                key, convert = RENAMED_KEYS[key]
                value = convert(value)
            if key not in RETIRED_KEYS:
                _apply(cfg, key, value, "<saved config>")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (JSON) beside a stage's outputs; atomically (a resume and `eval` read it, and
    a run killed while writing it must not leave half a config)."""
    write_text_atomic(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train.lr": ..., ...} from nested dicts (configs, fingerprints)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_configs(a: dict, b: dict, prefix: str = "") -> dict:
    """Keys whose values differ between two nested dicts (resolved configs, fingerprints): {key: (a, b)}."""
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(diff_configs(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out[f"{prefix}{k}"] = (va, vb)
    return out

