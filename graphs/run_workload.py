"""What a command runs on: device, dtype, model preset, latent grid, weights and the (random) text conditioning.

Every "auto" flag is resolved here, once, from whether a GPU is visible, so `run`, `bench` and `profile` agree:
on CPU the tiny preset in fp32 on a small grid (seconds on two cores); on a GPU the ltx2.3 preset in bf16 on the
HQ stage-1 grid (960x544x121 = 8160 video tokens, 126 audio tokens, 1024 text tokens).

There is no text encoder in this project: text contexts are seeded random tensors with the widths the
transformer sees after the text connector. They are drawn on the CPU and then moved, so one seed gives the
same inputs on every device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from graphs.cli_console import CommandError, Progress, shorten
from pipeline.config import LatentGrid, ModelConfig
from pipeline.guidance import GuidanceConfig

GPU_ONLY_EXECUTORS = ("graphs", "compile+graphs")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Defaults per device kind: (preset, dtype, executor, (width, height, frames, fps), text tokens)
CPU_DEFAULTS = ("tiny", "fp32", "eager", (128, 128, 17, 24.0), 16)
GPU_DEFAULTS = ("ltx2.3", "bf16", "graphs", (960, 544, 121, 24.0), 1024)


def resolve_device(text: str) -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; an explicit cuda device without a GPU is a CommandError."""
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise CommandError(f"--device {text!r} is not a device name", hint="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(
                f"--device {text} needs a CUDA GPU but none is visible (torch.cuda.is_available() is False)",
                hint="use --device cpu, or check the driver and CUDA_VISIBLE_DEVICES",
                code=3,
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise CommandError(
                f"--device {text}: only {torch.cuda.device_count()} GPU(s) visible", hint="use cuda:0", code=3
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise CommandError(f"--device {text!r} is not supported", hint="use auto, cpu, cuda or cuda:N")
    return device


def defaults_for(device: torch.device) -> tuple:
    return GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS


def resolve_executor(text: str, device: torch.device) -> str:
    """'auto' -> graphs on a GPU, eager on CPU; a GPU-only executor on CPU is a one-line CommandError."""
    executor = defaults_for(device)[2] if text == "auto" else text
    check_executor(executor, device)
    return executor


def check_executor(executor: str, device: torch.device, flag: str = "--executor") -> None:
    """A GPU-only executor on CPU is a one-line CommandError; `flag` is the option that named it, for the hint."""
    if executor in GPU_ONLY_EXECUTORS and device.type != "cuda":
        why = "no CUDA GPU is visible" if not torch.cuda.is_available() else f"--device is {device}"
        raise CommandError(
            f"executor '{executor}' captures CUDA graphs and needs a GPU, but {why}",
            hint=f"use {flag} eager (or compile) on CPU",
            code=3,
        )


@dataclass(frozen=True)
class Workload:
    """The resolved inputs of a command: everything needed to build the model and its inputs."""

    device: torch.device
    dtype: torch.dtype
    preset: str
    config: ModelConfig
    grid: LatentGrid
    text_tokens: int
    seed: int
    weights: str | None = None
    overlap_audio: bool = True  # the audio chain on a side CUDA stream (pipeline/streams.py)
    share_text_kv: bool = True  # graph executors: passes of one text share its keys/values (graphs/executor.py)
    fp8: bool = False  # e4m3 GEMMs for the video and text projections (pipeline/fp8.py)

    def describe(self) -> str:
        g = self.grid
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"{self.preset} ({self.config.num_layers} layers) {dtype} on {self.device}, "
            f"{g.num_video_tokens} video tokens ({g.frames}x{g.height}x{g.width} latents), "
            f"{g.num_audio_tokens} audio, {self.text_tokens} text"
            + ("" if self.overlap_audio else ", audio on the video stream")
            + ("" if self.share_text_kv else ", text K/V per pass")
            + (", FP8 projections" if self.fp8 else "")
        )


def resolve_workload(args, *, grid: LatentGrid | None = None) -> Workload:
    """Build a Workload from parsed flags (`--device/--dtype/--preset/--seed/--weights` and the shape flags)."""
    device = resolve_device(args.device)
    preset, dtype_name, _, pixels, text_tokens = defaults_for(device)
    preset = preset if args.preset == "auto" else args.preset
    dtype_name = dtype_name if args.dtype == "auto" else args.dtype
    if device.type == "cpu" and dtype_name == "fp16":
        raise CommandError("--dtype fp16 is not supported on CPU", hint="use fp32 or bf16")
    if grid is None:
        grid = grid_from_args(args, default_pixels=pixels)
    return Workload(
        device=device,
        dtype=DTYPES[dtype_name],
        preset=preset,
        config=ModelConfig.preset(preset),
        grid=grid,
        text_tokens=args.text_tokens or text_tokens,
        seed=args.seed,
        weights=args.weights,
        overlap_audio=not getattr(args, "no_audio_stream", False),
        share_text_kv=not getattr(args, "no_shared_text_kv", False),
        fp8=_fp8_flag(args, device, dtype_name),
    )


def _fp8_flag(args, device: torch.device, dtype_name: str) -> bool:
    """`--fp8`, refused where it cannot run (`pipeline.fp8.fp8_unsupported`; on CPU it runs, in float32 math)."""
    from pipeline.fp8 import fp8_unsupported

    if not getattr(args, "fp8", False):
        return False
    reason = fp8_unsupported(device)
    if reason:
        raise CommandError(f"--fp8: {reason}", hint="drop --fp8")
    if device.type == "cuda" and dtype_name != "bf16":
        raise CommandError(f"--fp8 on a GPU needs a bf16 model (the row-wise FP8 GEMMs write bf16), got --dtype "
                           f"{dtype_name}", hint="use --dtype bf16 (or auto) with --fp8")
    return True


def grid_from_args(args, *, default_pixels: tuple[int, int, int, float]) -> LatentGrid:
    """The latent grid from --tokens, or from --resolution/--frames/--fps (missing ones from the defaults)."""
    width, height, frames, fps = default_pixels
    fps = args.fps if args.fps is not None else fps  # not `or`: a given value is never swapped for the default
    if getattr(args, "tokens", None):
        if args.resolution or args.frames:
            raise CommandError("--tokens cannot be combined with --resolution/--frames", hint="give one of the two")
        return LatentGrid.from_tokens(args.tokens, audio_tokens=args.audio_tokens, fps=fps)
    if args.resolution:
        width, height = args.resolution
    grid = LatentGrid.from_pixels(width=width, height=height, num_frames=args.frames or frames, fps=fps)
    if args.audio_tokens:
        grid = LatentGrid(grid.frames, grid.height, grid.width, args.audio_tokens, grid.fps)
    return grid


def fitted_guidance(preset: str, num_layers: int) -> tuple[GuidanceConfig, str | None]:
    """(the guidance preset `preset` with its STG blocks fitted to a model of `num_layers` layers, the note
    `GuidanceConfig.fitted_to` gives when it moved them, else None).

    The one place `run`, `bench` and `coldstart` turn a preset name into the passes they warm up and time: the
    dev preset names block 28 of the 48-layer model, which the tiny and small presets do not have.
    """
    return GuidanceConfig.preset(preset).fitted_to(num_layers)


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the model, counted on the meta device (no memory)."""
    from pipeline.model import LTX2Transformer

    with torch.device("meta"):
        model = LTX2Transformer(config)
    return sum(p.numel() for p in model.parameters())


def build_model(workload: Workload, progress: Progress) -> torch.nn.Module:
    """The transformer on the workload's device: seeded random weights, or `--weights` loaded and checked."""
    from pipeline import model as model_lib

    params = parameter_count(workload.config)
    size_gb = params * torch.empty((), dtype=workload.dtype).element_size() / 1e9
    source = f"weights from {workload.weights}" if workload.weights else f"random weights (seed {workload.seed})"
    count = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
    progress(f"building {workload.preset}: {count} parameters ({size_gb:.2f} GB), {source}")
    free = torch.cuda.mem_get_info(workload.device)[0] if workload.device.type == "cuda" else available_host_bytes()
    if free is not None and size_gb * 1e9 > free:
        where = "the GPU has" if workload.device.type == "cuda" else "this machine has"
        raise CommandError(
            f"the {workload.preset} model needs {size_gb:.1f} GB but {where} {free / 1e9:.1f} GB free",
            hint="use --preset small (or tiny), or free memory",
            code=3,
        )
    if workload.weights:
        model = load_weights(workload)
    else:
        model = model_lib.build_model(workload.config, device=workload.device, dtype=workload.dtype, seed=workload.seed)
    model.eval().requires_grad_(False)
    model.overlap_audio = workload.overlap_audio
    if workload.fp8:
        quantize(model, progress)
    progress("model ready")
    return model


def available_host_bytes() -> int | None:
    """Memory a new allocation can take without swapping (Linux `MemAvailable`); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def quantize(model: torch.nn.Module, progress: Progress) -> None:
    """The video and text projections to e4m3 in place (`pipeline.fp8.quantize_fp8`), with a progress line."""
    from pipeline.fp8 import quantize_fp8

    count = quantize_fp8(model)
    progress(f"{count} projections quantized to FP8 (e4m3, per-channel weight and per-token input scales)")


def load_weights(workload: Workload) -> torch.nn.Module:
    """Load a real checkpoint through pipeline.weights; a mismatch becomes a one-line CommandError."""
    from pipeline import model as model_lib
    from pipeline import weights as weights_lib

    if not os.path.exists(workload.weights):
        raise CommandError(f"--weights {workload.weights}: no such file or directory", hint="check the path")
    _check_weight_files(workload.weights)
    # Allocate without initialising (the checkpoint fills every parameter; the loader checks that it does).
    model = model_lib.build_model(workload.config, device="meta", dtype=workload.dtype)
    model = model.to_empty(device=workload.device)
    try:
        weights_lib.load_weights(model, workload.weights)
    except FileNotFoundError as e:
        raise CommandError(f"--weights {workload.weights}: no such file or directory", hint="check the path") from e
    except (KeyError, ValueError) as e:
        raise CommandError(
            f"--weights {workload.weights} does not match the {workload.preset} preset: {shorten(str(e))}",
            hint="real LTX-2.3 checkpoints need --preset ltx2.3",
        ) from e
    return model


def _check_weight_files(path: str) -> None:
    """Before allocating the model: `--weights` names readable safetensors files (every shard of an index) holding
    transformer-block tensors. A truncated download, a missing shard or another kind of file is named as such,
    not reported as a checkpoint that does not match the preset."""
    from safetensors import safe_open

    from pipeline import weights as weights_lib

    formats = "pass a Lightricks single-file checkpoint or a diffusers transformer directory"
    if os.path.isdir(path) or path.endswith(".index.json"):
        try:
            files = [str(file) for file in weights_lib.diffusers_weight_files(path)]
        except ValueError as e:
            raise CommandError(f"--weights {path}: {e}", hint=formats) from e
    else:
        files = [path]
    keys: list[str] = []
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                keys += f.keys()
        except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
            raise CommandError(f"--weights {path}: {file!r} is not a readable safetensors file ({shorten(str(e))})",
                               hint="check that the file is complete (an interrupted download?)") from e
    if not any("transformer_blocks." in key for key in keys):
        raise CommandError(
            f"--weights {path} holds no LTX-2.3 transformer tensors (no key like "
            "'model.diffusion_model.transformer_blocks.0...' or 'transformer_blocks.0...')",
            hint=formats,
        )


def random_conditioning(workload: Workload):
    """Positive and negative random text contexts plus the RoPE tables of the grid (built once, outside forward)."""
    from pipeline import executor

    return executor.random_conditioning(
        workload.config,
        workload.grid,
        generator=torch.Generator().manual_seed(workload.seed + 1),
        text_tokens=workload.text_tokens,
        device=workload.device,
        dtype=workload.dtype,
    )


def random_latents(workload: Workload, *, seed_offset: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random (video [1, Nv, C], audio [1, Na, C]) latents in the model dtype, for benchmarks."""
    generator = torch.Generator().manual_seed(workload.seed + seed_offset)
    c, g = workload.config, workload.grid
    video = torch.randn(1, g.num_video_tokens, c.in_channels, generator=generator)  # [B, Nv, C]
    audio = torch.randn(1, g.num_audio_tokens, c.audio_in_channels, generator=generator)  # [B, Na, C]
    return (
        video.to(device=workload.device, dtype=workload.dtype),
        audio.to(device=workload.device, dtype=workload.dtype),
    )


@contextlib.contextmanager
def cpu_threads(workload: Workload) -> Iterator[None]:
    """One intra-op thread for the tiny preset on CPU, restored afterwards.

    The tiny model's ops take microseconds; splitting them over threads only adds wake-up and spin-wait costs,
    and on a shared 2-core CI machine the spinning threads fight other processes (measured: a tiny forward took
    ~0.5 s with 2 threads on a loaded machine, 30 ms with 1). Larger presets keep torch's default.
    """
    if workload.device.type != "cpu" or workload.preset != "tiny":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
