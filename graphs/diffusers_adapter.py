"""diffusers' `LTX2VideoTransformer3DModel` behind this project's forward signature, so any pass executor
(eager, compiled, per-pass CUDA graphs) can run it: the benchmark's peer rows, and a way for diffusers users to
get per-pass graphs without changing their model.

The adapter translates a pass's options into diffusers' arguments, and refuses those diffusers cannot express:
- diffusers has ONE list of STG blocks for both streams (`spatio_temporal_guidance_blocks`), so the video and
  audio skip lists must be equal;
- diffusers has ONE switch for the audio<->video cross-attention (`isolate_modalities`), so A2V and V2A must be
  disabled together.

Capture-friendliness: diffusers builds RoPE position coordinates from Python numbers inside its forward
(`torch.tensor(list, device=...)`, a blocking host->device copy that also breaks capture). The adapter builds the
coordinates once per grid (`prepare(grid)`, outside any capture) and passes them in, as diffusers allows, so the
forward is device-only work. Its STG branch reads a CPU mask (`torch.all(mask == 0)` then `if`), which does not
wait for the GPU. Timesteps follow the LTX-2.3 pipeline: `timestep = sigma * 1000` for both streams, the prompt
AdaLN's `sigma` argument gets the same value, and `use_cross_timestep=True`.

Weights: `from_ltx2(model)` copies our weights under diffusers names (`pipeline.weights.diffusers_state_dict`),
either GPU to GPU, or staged through CPU memory (`stage_to_cpu` then `peer_from_state`) when both copies would
not fit on the GPU: the benchmark frees our model between the two.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.config import LatentGrid, ModelConfig


def diffusers_available() -> bool:
    try:
        from diffusers import LTX2VideoTransformer3DModel  # noqa: F401
    except Exception:
        return False
    return True


def diffusers_pass_kwargs(
    *,
    skip_video_self_attn_blocks: Sequence[int] = (),
    skip_audio_self_attn_blocks: Sequence[int] = (),
    disable_a2v_cross_attn: bool = False,
    disable_v2a_cross_attn: bool = False,
) -> dict:
    """Our four pass options as diffusers' forward arguments; ValueError when diffusers cannot express them."""
    video, audio = tuple(sorted(skip_video_self_attn_blocks)), tuple(sorted(skip_audio_self_attn_blocks))
    if video != audio:
        raise ValueError(
            f"diffusers' transformer skips the same STG blocks in both streams, but this pass skips video blocks "
            f"{list(video)} and audio blocks {list(audio)}; expected equal lists"
        )
    if disable_a2v_cross_attn != disable_v2a_cross_attn:
        raise ValueError(
            "diffusers' transformer disables audio->video and video->audio cross-attention together "
            f"(isolate_modalities), but this pass has disable_a2v_cross_attn={disable_a2v_cross_attn} and "
            f"disable_v2a_cross_attn={disable_v2a_cross_attn}; expected both True or both False"
        )
    return {"spatio_temporal_guidance_blocks": list(video) or None, "isolate_modalities": disable_a2v_cross_attn}


class DiffusersPassModel(nn.Module):
    """`LTX2VideoTransformer3DModel` with `LTX2Transformer.forward`'s signature (see the module docstring).

    Call `prepare(grid)` once per grid before running (or capturing) passes on it.
    """

    def __init__(self, transformer: nn.Module, config: ModelConfig):
        super().__init__()
        self.transformer = transformer
        self.config = config
        self.weights_version = 0  # graph keys include it; bump after changing the weights in place
        self._repeated_blocks = getattr(transformer, "_repeated_blocks", None)
        self._grid: LatentGrid | None = None
        self._coords_by_grid: dict[LatentGrid, tuple[Tensor, Tensor]] = {}
        # The current grid's coordinates live in (non-persistent) buffers: a CUDA graph bakes their addresses in,
        # and graph keys fingerprint every buffer's address, so switching grids is a cache miss, never a replay
        # that reads another grid's coordinates. Every grid's coordinates stay alive (switching back hits again).
        empty = torch.empty(0, device=self.device)
        self.register_buffer("video_coords", empty, persistent=False)
        self.register_buffer("audio_coords", empty.clone(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_in.weight.device

    def prepare(self, grid: LatentGrid) -> None:
        """Make `grid` current, building diffusers' RoPE coordinates for it on the model's device the first time
        (outside any capture)."""
        if grid not in self._coords_by_grid:
            rope, audio_rope = self.transformer.rope, self.transformer.audio_rope
            self._coords_by_grid[grid] = (
                rope.prepare_video_coords(1, grid.frames, grid.height, grid.width, self.device, fps=grid.fps),
                audio_rope.prepare_audio_coords(1, grid.audio_tokens, self.device),
            )  # [1, 3, Nv, 2], [1, 1, Na, 2]
        self.video_coords, self.audio_coords = self._coords_by_grid[grid]
        self._grid = grid

    def forward(
        self,
        video: Tensor,
        audio: Tensor,
        video_context: Tensor,
        audio_context: Tensor,
        sigma: Tensor,
        rope=None,
        *,
        skip_video_self_attn_blocks: Sequence[int] = (),
        skip_audio_self_attn_blocks: Sequence[int] = (),
        disable_a2v_cross_attn: bool = False,
        disable_v2a_cross_attn: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Velocity (video [B, Nv, 128], audio [B, Na, 128]). `rope` is accepted for signature compatibility;
        diffusers computes its own tables from the coordinates built by `prepare`."""
        options = diffusers_pass_kwargs(
            skip_video_self_attn_blocks=skip_video_self_attn_blocks,
            skip_audio_self_attn_blocks=skip_audio_self_attn_blocks,
            disable_a2v_cross_attn=disable_a2v_cross_attn,
            disable_v2a_cross_attn=disable_v2a_cross_attn,
        )
        if self._grid is None:
            raise ValueError("DiffusersPassModel.forward called before prepare(grid)")
        g = self._grid
        if video.shape[1] != g.num_video_tokens or audio.shape[1] != g.num_audio_tokens:
            raise ValueError(
                f"latents have {video.shape[1]} video / {audio.shape[1]} audio tokens but prepare() was called for "
                f"{g.num_video_tokens} / {g.num_audio_tokens}; call prepare(grid) for the new grid"
            )
        b = video.shape[0]
        video_coords = self.video_coords.expand(b, -1, -1, -1)  # [B, 3, Nv, 2]
        audio_coords = self.audio_coords.expand(b, -1, -1, -1)  # [B, 1, Na, 2]
        timestep = sigma * self.config.timestep_scale  # [B] on the device: no host read
        out = self.transformer(
            hidden_states=video,
            audio_hidden_states=audio,
            encoder_hidden_states=video_context,
            audio_encoder_hidden_states=audio_context,
            timestep=timestep,
            audio_timestep=timestep,
            sigma=timestep,
            num_frames=g.frames,
            height=g.height,
            width=g.width,
            fps=g.fps,
            audio_num_frames=g.audio_tokens,
            video_coords=video_coords,
            audio_coords=audio_coords,
            use_cross_timestep=True,
            return_dict=False,
            **options,
        )
        return out[0], out[1]

    def compile_repeated_blocks(self, **kwargs) -> None:
        """diffusers' own regional compile (`torch.compile` of every `LTX2VideoTransformerBlock`), what a diffusers
        user would call. It stays installed: run the compiled rows after the eager ones."""
        self.transformer.compile_repeated_blocks(**kwargs)


def empty_diffusers_transformer(config: ModelConfig, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """diffusers' transformer for `config`, allocated on `device` in `dtype` but not initialised (meta build)."""
    from diffusers import LTX2VideoTransformer3DModel

    from pipeline.weights import diffusers_config

    with torch.device("meta"):
        transformer = LTX2VideoTransformer3DModel(**diffusers_config(config))
    # nn.Module.to, not ModelMixin.to: the latter warns about float32-only modules, which this model has none of.
    transformer = nn.Module.to(transformer, dtype)
    return transformer.to_empty(device=device).eval().requires_grad_(False)


def load_from_state_dict(transformer: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy `state` (diffusers names) into `transformer`; every parameter must be covered, with its shape."""
    params = dict(transformer.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    misshaped = [n for n in params.keys() & state.keys() if tuple(params[n].shape) != tuple(state[n].shape)]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"weights do not match diffusers' transformer: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"mis-shaped {misshaped[:3]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def from_ltx2(model: nn.Module, *, device: torch.device | None = None) -> DiffusersPassModel:
    """A diffusers peer holding the same weights as our `model`, on `device` (default: the model's).

    Copies tensor by tensor (GPU to GPU); when two copies do not fit (`needs_cpu_staging`), use `stage_to_cpu`,
    free our model, then `peer_from_state`.
    """
    from pipeline.fp8 import is_quantized
    from pipeline.weights import iter_mapped_tensors, diffusers_key_map

    if is_quantized(model):  # before allocating a whole transformer for it
        raise ValueError("from_ltx2: the model's projections are FP8 (pipeline.fp8); the diffusers peer needs the "
                         "bf16 model")
    device = device or model.device
    transformer = empty_diffusers_transformer(model.config, device=device, dtype=model.dtype)
    params = dict(transformer.named_parameters())
    with torch.no_grad():
        for name, tensor in iter_mapped_tensors(model, diffusers_key_map(model.config)):
            params[name].copy_(tensor)
    return DiffusersPassModel(transformer, model.config)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the weights, parameters and buffers (an FP8 model's e4m3 weights are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def needs_cpu_staging(model: nn.Module, *, headroom: float = 0.85) -> bool:
    """True when a second copy of the weights would not fit in the GPU's free memory (with headroom for
    activations): then the peer is built through CPU memory after our model is freed."""
    if model.device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(model.device)
    return model_bytes(model) > headroom * free


def stage_to_cpu(model: nn.Module) -> dict[str, Tensor]:
    """Our weights under diffusers names, copied to CPU memory."""
    from pipeline.weights import diffusers_state_dict

    # Pageable memory: pinning ~38 GB costs more time (and locked host memory) than it saves on one copy back.
    return diffusers_state_dict(model, device="cpu")


def peer_from_state(
    state: dict[str, Tensor], config: ModelConfig, *, device: torch.device, dtype: torch.dtype
) -> DiffusersPassModel:
    """A diffusers peer built on `device` from a (CPU) diffusers state dict."""
    transformer = empty_diffusers_transformer(config, device=device, dtype=dtype)
    load_from_state_dict(transformer, state)
    return DiffusersPassModel(transformer, config)


def free_cuda_memory() -> None:
    """Return cached blocks to the driver after dropping a model (so the next one can allocate)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
