"""Checkpoint key maps and safetensors loading (Lightricks single-file and diffusers formats).

Every parameter of `LTX2Transformer` maps to one or more named tensors of the other format; fused parameters
(self-attention [q | k | v | gate], cross-attention [q | gate] and [k | v]) map to row ranges. Loading reads one
tensor at a time (safetensors `safe_open`) and copies it into its (slice of the) parameter, so it never needs
twice the model's memory; every key is checked (names, shapes and dtypes, from the safetensors header) before
anything is copied, and all problems are reported in one error. Only safetensors are read (never pickle).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from pipeline.config import ModelConfig
from pipeline.fp8 import is_quantized
from pipeline.model import LTX2Transformer

OFFICIAL_PREFIX = "model.diffusion_model."
# Inside the DiT prefix of single-file checkpoints but not part of the DiT (text connectors run outside it).
OFFICIAL_IGNORED = ("video_embeddings_connector.", "audio_embeddings_connector.")
OFFICIAL_MARKER = "patchify_proj.weight"  # a DiT key only the official names have (diffusers: proj_in.weight)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# Source dtypes (safetensors header names) a weight may have: the copy into the model casts them, which is only
# meaningful between full floating types. Ints, bools and float8 (which needs its scales) would be cast silently.
LOADABLE_DTYPES = ("F16", "BF16", "F32", "F64")


class KeySource(NamedTuple):
    """One tensor of another format that fills rows [start, stop) of our parameter (rows None: all of it)."""

    name: str
    rows: tuple[int, int] | None = None


KeyMap = dict[str, tuple[KeySource, ...]]  # our parameter name -> its sources, in row order


class WeightLoadError(ValueError):
    """Missing, unexpected, mis-shaped or mis-typed checkpoint tensors (all listed in the message)."""


# Module names per format: (ours, diffusers, official). Fused attention modules are expanded in `_key_map`.
_TOP_LINEARS = (
    ("video_in", "proj_in", "patchify_proj"),
    ("audio_in", "audio_proj_in", "audio_patchify_proj"),
    ("video_out", "proj_out", "proj_out"),
    ("audio_out", "audio_proj_out", "audio_proj_out"),
)
_ADALNS = (
    ("video_time", "time_embed", "adaln_single"),
    ("audio_time", "audio_time_embed", "audio_adaln_single"),
    ("video_prompt", "prompt_adaln", "prompt_adaln_single"),
    ("audio_prompt", "audio_prompt_adaln", "audio_prompt_adaln_single"),
    ("video_av", "av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
    ("audio_av", "av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
    ("video_av_gate", "av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
    ("audio_av_gate", "av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single"),
)
_ADALN_PARTS = (("fc1", "emb.timestep_embedder.linear_1"), ("fc2", "emb.timestep_embedder.linear_2"),
                ("proj", "linear"))
_TOP_TABLES = (("video_out_table", "scale_shift_table"), ("audio_out_table", "audio_scale_shift_table"))
_BLOCK_TABLES = (
    ("video_table", "scale_shift_table", "scale_shift_table"),
    ("audio_table", "audio_scale_shift_table", "audio_scale_shift_table"),
    ("video_prompt_table", "prompt_scale_shift_table", "prompt_scale_shift_table"),
    ("audio_prompt_table", "audio_prompt_scale_shift_table", "audio_prompt_scale_shift_table"),
    ("video_av_table", "video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
    ("audio_av_table", "audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
)
# (ours, theirs (both formats), is self-attention, video-width heads?)
_BLOCK_ATTNS = (
    ("video_self", "attn1", True, True),
    ("audio_self", "audio_attn1", True, False),
    ("video_text", "attn2", False, True),
    ("audio_text", "audio_attn2", False, False),
    ("a2v", "audio_to_video_attn", False, False),
    ("v2a", "video_to_audio_attn", False, False),
)
_BLOCK_FFS = (("video_ff", "ff"), ("audio_ff", "audio_ff"))


def _key_map(config: ModelConfig, fmt: str) -> KeyMap:
    official = fmt == "official"
    norm_q, norm_k = ("q_norm", "k_norm") if official else ("norm_q", "norm_k")
    m: KeyMap = {}

    def linear(ours: str, theirs: str) -> None:
        for leaf in ("weight", "bias"):
            m[f"{ours}.{leaf}"] = (KeySource(f"{theirs}.{leaf}"),)

    def fused(ours: str, parts: list[tuple[str, int]]) -> None:
        """Our Linear `ours` stacks the Linears `parts` (name, rows) along the output dim."""
        for leaf in ("weight", "bias"):
            sources, start = [], 0
            for theirs, rows in parts:
                sources.append(KeySource(f"{theirs}.{leaf}", (start, start + rows)))
                start += rows
            m[f"{ours}.{leaf}"] = tuple(sources)

    for ours, diff, off in _TOP_LINEARS:
        linear(ours, off if official else diff)
    for ours, diff, off in _ADALNS:
        for our_part, their_part in _ADALN_PARTS:
            linear(f"{ours}.{our_part}", f"{off if official else diff}.{their_part}")
    for ours, theirs in _TOP_TABLES:
        m[ours] = (KeySource(theirs),)
    for i in range(config.num_layers):
        b, t = f"blocks.{i}", f"transformer_blocks.{i}"
        for ours, diff, off in _BLOCK_TABLES:
            m[f"{b}.{ours}"] = (KeySource(f"{t}.{off if official else diff}"),)
        for ours, theirs, is_self, video_heads in _BLOCK_ATTNS:
            heads = config.video_heads if video_heads else config.audio_heads
            inner = heads * (config.video_head_dim if video_heads else config.audio_head_dim)
            o, th = f"{b}.{ours}", f"{t}.{theirs}"
            if is_self:
                fused(f"{o}.qkvg", [(f"{th}.to_q", inner), (f"{th}.to_k", inner), (f"{th}.to_v", inner),
                                    (f"{th}.to_gate_logits", heads)])
            else:
                fused(f"{o}.q_gate", [(f"{th}.to_q", inner), (f"{th}.to_gate_logits", heads)])
                fused(f"{o}.kv", [(f"{th}.to_k", inner), (f"{th}.to_v", inner)])
            m[f"{o}.q_norm"] = (KeySource(f"{th}.{norm_q}.weight"),)
            m[f"{o}.k_norm"] = (KeySource(f"{th}.{norm_k}.weight"),)
            linear(f"{o}.out", f"{th}.to_out.0")
        for ours, theirs in _BLOCK_FFS:
            linear(f"{b}.{ours}.fc1", f"{t}.{theirs}.net.0.proj")
            linear(f"{b}.{ours}.fc2", f"{t}.{theirs}.net.2")
    return m


def official_key_map(config: ModelConfig) -> KeyMap:
    """Ours -> Lightricks single-file names (without the `model.diffusion_model.` prefix)."""
    return _key_map(config, "official")


def diffusers_key_map(config: ModelConfig) -> KeyMap:
    """Ours -> diffusers `LTX2VideoTransformer3DModel` state-dict names."""
    return _key_map(config, "diffusers")


def _check_model(model: object) -> None:
    """What loading and exporting need: an `LTX2Transformer` (the key maps are its parameter names) with storage
    (a model built on the meta device has none: a load would copy into nothing) and plain floating-point Linears
    (a model whose projections are e4m3, `pipeline.fp8`, has no such weights)."""
    if not isinstance(model, LTX2Transformer):
        raise ValueError(f"model must be an LTX2Transformer (pipeline.model.build_model), got {type(model).__name__}")
    if model.device.type == "meta":
        raise WeightLoadError("the model is on the meta device, which holds no weights: build it on a real device "
                              "(or call model.to_empty(device=...)) before loading or exporting weights")
    if is_quantized(model):
        raise WeightLoadError("the model's projections are FP8 (pipeline.fp8.quantize_fp8): load or export its "
                              "weights before quantizing")


def _targets(model: torch.nn.Module, key_map: KeyMap) -> dict[str, tuple[str, tuple[int, int] | None, tuple]]:
    """Their name -> (our parameter name, rows, expected shape)."""
    params = dict(model.named_parameters())
    if set(params) != set(key_map):
        raise AssertionError(f"key map out of sync with the model: {sorted(set(params) ^ set(key_map))[:10]}")
    out = {}
    for ours, sources in key_map.items():
        shape = tuple(params[ours].shape)
        for src in sources:
            rows = src.rows
            out[src.name] = (ours, rows, shape if rows is None else (rows[1] - rows[0], *shape[1:]))
    return out


def _open_safetensors(path: Path):
    """`safe_open` on the CPU; a file that is not safetensors (truncated, another format, missing) is named."""
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise WeightLoadError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


_LISTED = 10  # names listed per kind of problem; a checkpoint of another depth has thousands


def _listed(what: str, items: list[str]) -> str:
    """'N what: a, b, ...' with at most `_LISTED` items and the count of the rest."""
    more = f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return f"{len(items)} {what}: " + ", ".join(items[:_LISTED]) + more


def _problem_report(missing, unexpected, misshaped, mistyped, duplicated) -> str:
    lines = []
    if missing:
        lines.append(_listed("missing", [f"{n} {list(s)}" for n, s in missing]))
    if unexpected:
        lines.append(_listed("unexpected", [f"{n} {list(s)}" for n, s in unexpected]))
    if misshaped:
        lines.append(_listed("mis-shaped", [f"{n} {list(s)} (expected {list(e)})" for n, s, e in misshaped]))
    if mistyped:
        lines.append(_listed("mis-typed", [f"{n} {d}" for n, d in mistyped])
                     + f" (expected one of {', '.join(LOADABLE_DTYPES)})")
    if duplicated:
        lines.append(_listed("in two files", [f"{n} ({a}, {b})" for n, a, b in duplicated]))
    return "; ".join(lines)


_BLOCK_INDEX = re.compile(r"(?:.*\.)?transformer_blocks\.(\d+)\.")  # either format, prefixed or not


def _depth_hint(names: list[str], num_layers: int) -> str:
    """What a wrong preset looks like, said first (it shows as thousands of keys, and long messages get cut)."""
    blocks = {int(m.group(1)) for m in map(_BLOCK_INDEX.match, names) if m}
    if not blocks or len(blocks) == num_layers:
        return ""
    return f": it holds {len(blocks)} transformer blocks, the model {num_layers} (check the preset)"


def _load(model: torch.nn.Module, files: list[Path], key_map: KeyMap, rename) -> None:
    """Check every tensor of `files` (renamed by `rename`, None = ignore) against `key_map`, then copy them in."""
    targets = _targets(model, key_map)
    seen: dict[str, Path] = {}  # name -> the file it was found in
    unexpected, misshaped, mistyped, duplicated, plan = [], [], [], [], []
    for path in files:
        with _open_safetensors(path) as f:
            for key in f.keys():
                name = rename(key)
                if name is None:
                    continue
                header = f.get_slice(key)  # shape and dtype from the header; no data read
                shape, dtype = tuple(header.get_shape()), header.get_dtype()
                if name not in targets:
                    unexpected.append((key, shape))
                    continue
                if name in seen:  # which copy is right is not ours to guess
                    duplicated.append((key, seen[name].name, path.name))
                    continue
                seen[name] = path
                if shape != targets[name][2]:
                    misshaped.append((key, shape, targets[name][2]))
                if dtype not in LOADABLE_DTYPES:
                    mistyped.append((key, dtype))
                plan.append((path, key, name))
    missing = [(n, t[2]) for n, t in targets.items() if n not in seen]
    if missing or unexpected or misshaped or mistyped or duplicated:
        report = _problem_report(missing, unexpected, misshaped, mistyped, duplicated)
        hint = _depth_hint([key for key, _ in unexpected] + list(seen), model.config.num_layers)
        raise WeightLoadError(f"checkpoint does not match the model{hint} ({report}); nothing was loaded")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path in files:  # one file open at a time, one tensor in host memory at a time
            with _open_safetensors(path) as f:
                for p, key, name in plan:
                    if p != path:
                        continue
                    ours, rows, _ = targets[name]
                    dst = params[ours] if rows is None else params[ours][rows[0]:rows[1]]
                    dst.copy_(f.get_tensor(key))
    model.weights_version += 1


def _official_rename(key: str, prefix: str = OFFICIAL_PREFIX) -> str | None:
    if not key.startswith(prefix):
        return None  # VAE, audio VAE, vocoder, text encoder...: not the DiT
    name = key[len(prefix):]
    return None if name.startswith(OFFICIAL_IGNORED) else name


def _official_prefix(keys: list[str]) -> str | None:
    """The prefix of a single file's DiT keys in official names: `model.diffusion_model.`, "" for a DiT saved
    without it (its names are official, e.g. `patchify_proj.weight`), None when neither (diffusers names)."""
    if any(k.startswith(OFFICIAL_PREFIX) for k in keys):
        return OFFICIAL_PREFIX
    return "" if OFFICIAL_MARKER in keys else None


def _file_keys(path: Path) -> list[str]:
    with _open_safetensors(path) as f:
        return list(f.keys())


def load_official_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a Lightricks single-file checkpoint (DiT keys under `model.diffusion_model.`, the rest ignored; a DiT
    saved without that prefix loads too)."""
    path = _existing(Path(path))
    prefix = _official_prefix(_file_keys(path))  # "" for a DiT saved without the prefix
    _load_official(model, path, OFFICIAL_PREFIX if prefix is None else prefix)


def _load_official(model: torch.nn.Module, path: Path, prefix: str) -> None:
    _check_model(model)
    _load(model, [path], official_key_map(model.config), lambda key: _official_rename(key, prefix))


def _existing(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"path {str(path)!r} does not exist")
    return path


def diffusers_weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a diffusers transformer: a file, an index JSON, or a directory holding either
    (`diffusion_pytorch_model.safetensors` or its sharded `.index.json`; a `transformer/` subfolder also works)."""
    path = _existing(Path(path))
    if path.is_dir():
        for folder in (path, path / "transformer"):
            if (folder / DIFFUSERS_INDEX).is_file():
                return diffusers_weight_files(folder / DIFFUSERS_INDEX)
            if (folder / DIFFUSERS_WEIGHTS).is_file():
                return [folder / DIFFUSERS_WEIGHTS]
        raise ValueError(f"path {str(path)!r} holds neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX}")
    if path.name.endswith(".index.json"):
        files = [path.parent / name for name in sorted(set(_index_weight_map(path).values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise WeightLoadError(f"index {str(path)!r} names shard file(s) that do not exist next to it: {missing}")
        return files
    if path.suffix == ".safetensors" and path.is_file():
        return [path]
    raise ValueError(f"path {str(path)!r} is not a .safetensors file, an .index.json or a directory of them")


def _index_weight_map(path: Path) -> dict[str, str]:
    """The "weight_map" (tensor name -> shard file name) of a sharded checkpoint's index JSON, or ValueError naming
    the file: a truncated or foreign index should say which file is wrong, not raise a bare KeyError."""
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"index {str(path)!r} is not valid JSON ({e}); expected a diffusers index with a "
                         '"weight_map" object') from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()):
        return weight_map
    if not isinstance(index, dict):
        seen = f"a JSON {type(index).__name__}"
    elif "weight_map" not in index:
        seen = f"an object with keys {sorted(index)}"
    else:
        seen = f'a "weight_map" that is a {type(weight_map).__name__}, or has non-string file names'
    raise ValueError(f'index {str(path)!r} has no "weight_map" object (tensor name -> shard file name); got {seen}')


def load_diffusers_transformer(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a diffusers-format `LTX2VideoTransformer3DModel` (single file, sharded index, or their folder)."""
    _check_model(model)
    _load(model, diffusers_weight_files(path), diffusers_key_map(model.config), lambda key: key)


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load either format: a directory / index JSON is diffusers; a single file is official if any key carries
    the `model.diffusion_model.` prefix or it has the official DiT's names without it, else diffusers."""
    p = _existing(Path(path))
    prefix = _official_prefix(_file_keys(p)) if p.is_file() and p.suffix == ".safetensors" else None
    if prefix is not None:  # the file's keys are read once
        return _load_official(model, p, prefix)
    return load_diffusers_transformer(model, p)


def iter_mapped_tensors(model: torch.nn.Module, key_map: KeyMap) -> Iterator[tuple[str, Tensor]]:
    """(their name, view of our parameter) for every tensor of the other format; views, no copies."""
    _check_model(model)
    params = dict(model.named_parameters())
    for ours, sources in key_map.items():
        p = params[ours].detach()
        for src in sources:
            yield src.name, p if src.rows is None else p[src.rows[0]:src.rows[1]]


def diffusers_state_dict(model: torch.nn.Module, *, device: torch.device | str = "cpu",
                         dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Our weights under diffusers names, copied to `device` (fused parameters split into their Linears).

    `LTX2VideoTransformer3DModel.from_config(diffusers_config(cfg))` + `load_state_dict(this)` gives the
    diffusers peer the same weights.
    """
    _check_model(model)
    return {name: t.to(device=device, dtype=dtype or t.dtype, copy=True).contiguous()
            for name, t in iter_mapped_tensors(model, diffusers_key_map(model.config))}


def official_state_dict(model: torch.nn.Module, *, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Our weights under single-file names (with the `model.diffusion_model.` prefix), copied to `device`."""
    _check_model(model)
    return {OFFICIAL_PREFIX + name: t.to(device=device, copy=True).contiguous()
            for name, t in iter_mapped_tensors(model, official_key_map(model.config))}


def diffusers_config(config: ModelConfig) -> dict:
    """`LTX2VideoTransformer3DModel` constructor arguments describing `config` (an LTX-2.3 architecture)."""
    return {
        "in_channels": config.in_channels, "out_channels": config.in_channels, "patch_size": 1, "patch_size_t": 1,
        "num_attention_heads": config.video_heads, "attention_head_dim": config.video_head_dim,
        "cross_attention_dim": config.video_context_dim, "vae_scale_factors": tuple(config.vae_scale_factors),
        "pos_embed_max_pos": config.video_max_pos[0], "base_height": config.video_max_pos[1],
        "base_width": config.video_max_pos[2], "gated_attn": True, "cross_attn_mod": True,
        "audio_in_channels": config.audio_in_channels, "audio_out_channels": config.audio_in_channels,
        "audio_patch_size": 1, "audio_patch_size_t": 1, "audio_num_attention_heads": config.audio_heads,
        "audio_attention_head_dim": config.audio_head_dim, "audio_cross_attention_dim": config.audio_context_dim,
        "audio_scale_factor": config.audio_scale_factor, "audio_pos_embed_max_pos": config.audio_max_pos,
        "audio_sampling_rate": config.audio_sampling_rate, "audio_hop_length": config.audio_hop_length,
        "audio_gated_attn": True, "audio_cross_attn_mod": True, "num_layers": config.num_layers,
        "activation_fn": "gelu-approximate", "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False,
        "norm_eps": config.norm_eps, "caption_channels": config.video_context_dim, "attention_bias": True,
        "attention_out_bias": True, "rope_theta": config.rope_theta, "rope_double_precision": True,
        "causal_offset": config.causal_offset,
        "timestep_scale_multiplier": _whole("timestep_scale", config.timestep_scale),
        "cross_attn_timestep_scale_multiplier": _whole("timestep_scale x cross_attn_gate_scale",
                                                       config.timestep_scale * config.cross_attn_gate_scale),
        "rope_type": "split", "use_prompt_embeddings": False, "perturbed_attn": True,
    }


def _whole(name: str, value: float) -> int:
    """`value` as the int diffusers' config takes, or ValueError: truncating 999.6 to 999 would export another
    model."""
    if value != round(value):
        raise ValueError(f"diffusers_config: ModelConfig {name} = {value!r} is not a whole number; diffusers' "
                         "LTX2VideoTransformer3DModel takes integer timestep multipliers")
    return round(value)


def save_diffusers_transformer(model: torch.nn.Module, directory: str | os.PathLike, *,
                               max_shard_bytes: int | None = None) -> Path:
    """Write our weights as a diffusers transformer folder (config.json + one file, or shards + index JSON)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "LTX2VideoTransformer3DModel", **diffusers_config(model.config)}
    cfg["vae_scale_factors"] = list(cfg["vae_scale_factors"])
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    state = diffusers_state_dict(model)
    if max_shard_bytes is None:
        save_file(state, directory / DIFFUSERS_WEIGHTS)
        return directory
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (directory / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2))
    return directory


def save_official_checkpoint(model: torch.nn.Module, path: str | os.PathLike, *,
                             extra: dict[str, Tensor] | None = None) -> Path:
    """Write our weights as a single-file checkpoint (`model.diffusion_model.` keys; `config` metadata holds
    diffusers-style transformer arguments, which the loader does not read); `extra` adds other components'
    tensors (as a real file has VAE etc.)."""
    from safetensors.torch import save_file

    clashes = sorted(k for k in extra or {} if k.startswith(OFFICIAL_PREFIX) and _official_rename(k) is not None)
    if clashes:  # they would overwrite (or add to) the DiT that the loader reads back
        raise ValueError(f"extra must hold other components' tensors, not the DiT's ({OFFICIAL_PREFIX}...): got "
                         f"{', '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}")
    state = official_state_dict(model)
    state.update(extra or {})
    meta = {"config": json.dumps({"transformer": diffusers_config(model.config)}), "model_version": "2.3"}
    save_file(state, Path(path), metadata=meta)
    return Path(path)
