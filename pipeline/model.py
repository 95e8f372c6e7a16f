"""The LTX-2.3 audio-video transformer, written for CUDA-graph capture.

Forward never touches the host: per-pass options (STG skip lists, A2V/V2A switches) are plain Python values that
select which code runs, RoPE tables come in precomputed, sigma is a device tensor, and all checks on the inputs
happen before any device work, on metadata only: `validate_inputs` (shapes, dtypes, devices, flags) and
`block_indices` (the STG skip lists and their ranges).

Speed-minded layout: AdaLN MLPs run once per sample (sigma [B]), not per token; one fused projection per
attention input; `F.rms_norm`; SDPA on [B, H, N, D] under a selectable backend (`attention_backend`); fc1's GELU
in the GEMM epilogue (`pipeline.fused`); on CUDA the audio chain on a side stream (`overlap_audio`,
`pipeline.streams`), for which each block is split into four methods that regional compile compiles one by one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.attention import CrossAttention, SelfAttention, exchange_attention
from pipeline.config import ModelConfig, block_indices
from pipeline.fp8 import Float8Linear, is_quantized, refuse_casts
from pipeline.fused import linear_gelu_tanh
from pipeline.noise import validate_seed
from pipeline.rope import CosSin, RopeTables
from pipeline.streams import SEQUENTIAL, AudioStreams, OverlapStreams, SideStreamCache
from pipeline.text_kv import BlockTextKV, stream_text_kv

ATTENTION_BACKENDS = {
    "auto": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
OUTPUT_NORM_EPS = 1e-6  # the output LayerNorm's eps: fixed in the reference, not `ModelConfig.norm_eps`

# Where a pinned backend runs (device type -> backend -> dtypes; None: any dtype). A backend that cannot run failed
# inside block 0 with "No viable backend for scaled_dot_product_attention", which names no setting.
_HALF = (torch.float16, torch.bfloat16)
BACKEND_DTYPES = {
    "cpu": {"auto": None, "flash": None, "math": None},
    "cuda": {"auto": None, "cudnn": _HALF, "flash": _HALF, "efficient": (torch.float32, *_HALF), "math": None},
}


def attention_backend_runs(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA pinned to `backend` runs on `device` in `dtype` (`BACKEND_DTYPES`; other devices: unknown,
    taken as yes)."""
    table = BACKEND_DTYPES.get(device.type)
    if table is None:
        return True
    return backend in table and (table[backend] is None or dtype in table[backend])


def rms(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without affine weight over the last dim."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def output_norm(x: Tensor) -> Tensor:
    """The output layer's LayerNorm without affine weight over the last dim (`OUTPUT_NORM_EPS`)."""
    return F.layer_norm(x, (x.shape[-1],), eps=OUTPUT_NORM_EPS)


def modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_sinusoid(timestep: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, T] float32 timestep, already scaled (sigma * 1000) -> its 256 sinusoids [B, T, 256] (cos | sin) in
    `dtype`: the input of every `AdaLNSingle`. Separate so that the AdaLNs fed the same timestep share one
    (`LTX2Transformer.modulation`: 8 small kernels each, launched before the first block of every pass)."""
    half = torch.arange(128, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(half * (-math.log(10000.0) / 128))  # [128]
    angles = timestep.float().unsqueeze(-1) * freqs  # [B, T, 128]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)  # [B, T, 256]


class AdaLNSingle(nn.Module):
    """PixArt adaLN-single: timestep -> 256 sinusoids -> fc1 -> SiLU -> fc2 (the embedding) -> SiLU -> proj.

    Takes the sinusoids (`timestep_sinusoid`), which the AdaLNs fed one timestep share; returns (rows of
    modulation [B, T, rows, D], embedding [B, T, D]); T is 1 per sample or the token count.
    """

    def __init__(self, dim: int, rows: int):
        super().__init__()
        self.rows = rows
        self.fc1 = nn.Linear(256, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, rows * dim)

    def forward(self, sinusoid: Tensor) -> tuple[Tensor, Tensor]:
        """sinusoid [B, T, 256] (`timestep_sinusoid`; cast to this module's dtype if in another)."""
        emb = self.fc2(F.silu(self.fc1(sinusoid.to(self.fc1.weight.dtype))))  # [B, T, D]
        mod = self.proj(F.silu(emb))  # [B, T, rows * D]
        return mod.unflatten(-1, (self.rows, -1)), emb  # [B, T, rows, D], [B, T, D]


class FeedForward(nn.Module):
    """fc2(gelu_tanh(fc1(x))); on CUDA the GELU runs in fc1's cuBLASLt epilogue (`pipeline.fused`), or, with an
    FP8 fc2 (`pipeline.fp8`), in the kernel that quantizes fc2's input."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, mult * dim)
        self.fc2 = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.fc2, Float8Linear):
            return self.fc2.of_gelu(self.fc1(x))
        return self.fc2(linear_gelu_tanh(x, self.fc1))


# Row slices of the 9-row AdaLN tables (shift, scale, gate each): self-attention, FFN, text cross-attention query.
SELF_ATTN, FFN, TEXT_ATTN = slice(0, 3), slice(3, 6), slice(6, 9)
FFN_GATE, TEXT_GATE = FFN.stop - 1, TEXT_ATTN.stop - 1  # the gate rows of the residual adds handed over
AV_GATE = 4  # the gate row of the 5-row A2V/V2A tables
# Rows of `Modulation.audio_gates`: the modulation rows of the audio chain's handed-over residual gates.
AUDIO_TEXT_GATE, AUDIO_FFN_GATE, AUDIO_V2A_GATE = 0, 1, 2


def ada_rows(table: Tensor, mod: Tensor, rows: slice) -> tuple[Tensor, ...]:
    """(shift, scale, gate) of one sublayer: the block's table rows plus the forward's modulation rows, each
    [B, T, D]. Only those rows are added (with per-token sigma, T is the video token count)."""
    return (table[rows] + mod[:, :, rows]).unbind(2)


class Modulation(NamedTuple):
    """Per-forward AdaLN outputs shared by every block, each [B, T, rows, dim]: T = 1 (per sample) for all but
    `video`, whose T is Nv under a per-token sigma."""

    video: Tensor  # 9 rows: shift/scale/gate of self-attn, FFN, text-cross-attn query
    audio: Tensor  # 9 rows
    video_av: Tensor  # 4 rows: a2v scale, a2v shift, v2a scale, v2a shift (video side)
    audio_av: Tensor  # 4 rows (audio side)
    video_av_gate: Tensor  # 1 row: A2V gate
    # 3 rows: audio's text and FFN gate rows and the V2A gate (AUDIO_*_GATE), copied into one tensor so that every
    # audio hand-over (`PendingResidual`) has one layout: the audio FFN region then compiles one variant whether
    # V2A ran before it (V2A residual) or not (text residual). One small kernel per forward. (Under autograd the
    # V2A AdaLN gets zero gradients, not none, in passes without V2A.)
    audio_gates: Tensor


class PendingResidual(NamedTuple):
    """A residual add handed to the next compiled region: `x + delta * gate`, the gate being the producing block's
    AdaLN table row plus the forward's modulation row for it.

    A region that ended with the add would write the sum and the next region read it back for its norm; handed
    over, the add fuses with that norm (inductor): one kernel fewer per hand-over and block (the last block's FFN
    residuals are added by the eager output head; profiling/PERF_LOG.md). The gate travels as its two halves,
    both views (a parameter row, a modulation row): carried as a tensor it would be one more region output and
    kernel. The hand-overs of one chain share one layout (for audio, `Modulation.audio_gates`), so a region
    compiles one variant for all blocks and for both hand-over kinds it may receive."""

    x: Tensor  # [B, N, D]: the residual stream before the add
    delta: Tensor  # [B, N, D]: the sublayer output (attention or FFN), not yet gated
    gate_table: Tensor  # [D]: the gate row of the producing block's AdaLN table
    gate_mod: Tensor  # [B, T, D]: the forward's AdaLN output for that row

    def add(self) -> Tensor:
        """The residual stream as a tensor: x + delta * (gate_table + gate_mod)."""
        return self.x + self.delta * (self.gate_table + self.gate_mod)


def nothing_pending(x: Tensor, gate_table: Tensor, gate_mod: Tensor) -> PendingResidual:
    """`x` as a hand-over that adds zero (`x + 0 * gate`: x, for a finite gate), so block 0's first region reads
    the layout every later block's reads and compiles no variant of its own; the gate halves only set that layout,
    and the zeros require grad when x does (dynamo guards on it too). Costs a zero fill and its read per pass: pass
    times unchanged within noise, 64 MiB more graph pool at 8160 video tokens (H200; profiling/PERF_LOG.md)."""
    return PendingResidual(x, torch.zeros_like(x).requires_grad_(x.requires_grad), gate_table, gate_mod)


def table_row(table: Tensor, row: int) -> Tensor:
    """Row `row` of a block's AdaLN table, as a `PendingResidual` carries it: detached when autograd is off. Made
    under no_grad, a view of a parameter still says requires_grad (with no grad_fn), and torch's module tracker
    (FlopCounterMode) refuses such a tensor in a module's inputs."""
    return table[row] if torch.is_grad_enabled() else table[row].detach()


def self_and_text_attention(x: Tensor, text_kv: tuple[Tensor, Tensor], self_attn: SelfAttention,
                            text_attn: CrossAttention, table: Tensor, mod: Tensor, rope: CosSin, skip: bool,
                            eps: float) -> tuple[Tensor, Tensor]:
    """One stream's self-attention (STG `skip`: value pass-through) and text cross-attention, each modulated; the
    self-attention is gated and added here. Returns (x after self-attention, text cross-attention output): the
    caller hands the text residual on (`PendingResidual`). x [B, N, D]; text_kv: the stream's text keys/values
    (`pipeline.text_kv`); table/mod: the 9-row AdaLN of the stream."""
    shift, scale, gate = ada_rows(table, mod, SELF_ATTN)  # [B, T, D] each
    q_shift, q_scale, _ = ada_rows(table, mod, TEXT_ATTN)
    h = modulate(rms(x, eps), scale, shift)
    h = self_attn.value_passthrough(h) if skip else self_attn(h, rope)
    x = x + h * gate
    return x, text_attn.attend_to(modulate(rms(x, eps), q_scale, q_shift), *text_kv)


def ffn_of(x: Tensor, ff: FeedForward, table: Tensor, mod: Tensor, eps: float) -> Tensor:
    """FFN(modulated rms(x)), with the FFN shift/scale rows of the stream's 9-row AdaLN (not gated, not added)."""
    shift, scale, _ = ada_rows(table, mod, FFN)
    return ff(modulate(rms(x, eps), scale, shift))


class AudioVideoBlock(nn.Module):
    """One LTX-2.3 block: self-attn, text cross-attn, A2V/V2A cross-attn, FFN, for both streams."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        vd, ad, eps = c.video_dim, c.audio_dim, c.norm_eps
        self.eps = eps
        self.video_self = SelfAttention(vd, c.video_heads, c.video_head_dim, eps)
        self.audio_self = SelfAttention(ad, c.audio_heads, c.audio_head_dim, eps)
        self.video_text = CrossAttention(vd, c.video_context_dim, c.video_heads, c.video_head_dim, eps)
        self.audio_text = CrossAttention(ad, c.audio_context_dim, c.audio_heads, c.audio_head_dim, eps)
        # Both directions run at audio width with audio heads.
        self.a2v = CrossAttention(vd, ad, c.audio_heads, c.audio_head_dim, eps)  # Q video, K/V audio
        self.v2a = CrossAttention(ad, vd, c.audio_heads, c.audio_head_dim, eps)  # Q audio, K/V video
        self.video_ff = FeedForward(vd, c.ffn_mult)
        self.audio_ff = FeedForward(ad, c.ffn_mult)
        self.video_table = nn.Parameter(torch.empty(9, vd))
        self.audio_table = nn.Parameter(torch.empty(9, ad))
        self.video_prompt_table = nn.Parameter(torch.empty(2, vd))
        self.audio_prompt_table = nn.Parameter(torch.empty(2, ad))
        self.video_av_table = nn.Parameter(torch.empty(5, vd))  # 4 scale/shift rows + the A2V gate row
        self.audio_av_table = nn.Parameter(torch.empty(5, ad))  # 4 scale/shift rows + the V2A gate row

    # Compiled one by one under regional torch.compile (graphs/compile.py): the stream switches between them
    # stay in Python, in `forward`. The split is the same with one stream (CPU, overlap off). The boundaries cost
    # no extra pass over the residual streams: each region hands its last residual add to the next region
    # (`PendingResidual`), where it fuses with the norm that reads the sum: video text residual -> exchange,
    # video FFN residual -> next block; audio text residual -> exchange and audio FFN (the exchange passes it on
    # when V2A is off), V2A residual -> audio FFN, audio FFN residual -> next block.
    # The text keys/values come in computed (`LTX2Transformer.text_kv`, all blocks at once, not compiled).
    compile_regions = ("video_attention", "audio_attention", "exchange_and_video_ffn", "audio_ffn")

    def forward(self, v: PendingResidual, a: PendingResidual, text_kv: BlockTextKV, mod: Modulation,
                rope: RopeTables, *, skip_video_self_attn: bool, skip_audio_self_attn: bool, a2v: bool, v2a: bool,
                streams: AudioStreams = SEQUENTIAL) -> tuple[PendingResidual, PendingResidual]:
        """v [B, Nv, Dv] and a [B, Na, Da], each with its last residual add pending (`PendingResidual.add` makes it
        a tensor; `nothing_pending` before block 0); text_kv: this block's text keys/values
        (`LTX2Transformer.text_kv`). Returns both streams the same way. Audio-only work runs under
        `streams.side()` (pipeline/streams.py), which the caller forked before the first block and joins after
        the last.

        Per block: audio attention (side) next to video attention (main); join; exchange + video FFN (main); fork;
        audio FFN (side). The fork comes after the whole exchange region, video FFN included, so the audio FFN
        overlaps the next block's video attention. With A2V and V2A both off (the modality pass) nothing crosses
        the streams: no join or fork, and the audio chain runs on through the blocks on its side stream.
        """
        with streams.side():
            a = self.audio_attention(a, (text_kv.audio_k, text_kv.audio_v), mod, rope, skip_audio_self_attn)
        v = self.video_attention(v, (text_kv.video_k, text_kv.video_v), mod, rope, skip_video_self_attn)
        exchange = a2v or v2a
        if exchange:
            streams.join()  # the exchange reads both chains
        v, a = self.exchange_and_video_ffn(v, a, mod, rope, a2v, v2a)
        if exchange:
            streams.fork(*a)  # the audio FFN (side stream) reads the audio hand-over the exchange returns
        with streams.side():
            a = self.audio_ffn(a, mod)
        return v, a

    def video_gate(self, mod: Modulation, row: int) -> tuple[Tensor, Tensor]:
        """The halves a `PendingResidual` carries of a video gate: this block's table row `row` (`FFN_GATE` or
        `TEXT_GATE`) and the forward's modulation row."""
        return table_row(self.video_table, row), mod.video[:, :, row]

    def audio_gate(self, mod: Modulation, row: int) -> tuple[Tensor, Tensor]:
        """The halves a `PendingResidual` carries of an audio gate `row` (`AUDIO_TEXT_GATE`, `AUDIO_FFN_GATE` or
        `AUDIO_V2A_GATE`): the matching table row (the audio table's text or FFN gate, or the A/V table's) and
        that row of `mod.audio_gates`."""
        tables = ((self.audio_table, TEXT_GATE), (self.audio_table, FFN_GATE), (self.audio_av_table, AV_GATE))
        return table_row(*tables[row]), mod.audio_gates[:, :, row]

    def video_attention(self, v: PendingResidual, kv: tuple[Tensor, Tensor], mod: Modulation, rope: RopeTables,
                        skip: bool) -> PendingResidual:
        x, text_out = self_and_text_attention(v.add(), kv, self.video_self, self.video_text, self.video_table,
                                              mod.video, rope.video, skip, self.eps)
        return PendingResidual(x, text_out, *self.video_gate(mod, TEXT_GATE))

    def audio_attention(self, a: PendingResidual, kv: tuple[Tensor, Tensor], mod: Modulation, rope: RopeTables,
                        skip: bool) -> PendingResidual:
        x, text_out = self_and_text_attention(a.add(), kv, self.audio_self, self.audio_text, self.audio_table,
                                              mod.audio, rope.audio, skip, self.eps)
        return PendingResidual(x, text_out, *self.audio_gate(mod, AUDIO_TEXT_GATE))

    def exchange_and_video_ffn(self, v_pending: PendingResidual, a_pending: PendingResidual, mod: Modulation,
                               rope: RopeTables, a2v: bool, v2a: bool) -> tuple[PendingResidual, PendingResidual]:
        """A2V/V2A cross-attention (both read the same pre-update snapshot rms(v), rms(a)), then the video FFN.

        The pending text residuals are added first, and the video FFN shares this region, so under compile each
        residual add fuses with the norm after it. The video FFN's residual is handed on to the next block, the
        V2A residual to the audio FFN (`PendingResidual`); without V2A the audio stream goes on as it came.
        """
        eps = self.eps
        v = v_pending.add()
        if a2v or v2a:
            a = a_pending.add()
            nv, na = rms(v, eps), rms(a, eps)
            v_a2v_scale, v_a2v_shift, v_v2a_scale, v_v2a_shift = (self.video_av_table[:4] + mod.video_av).unbind(2)
            a_a2v_scale, a_a2v_shift, a_v2a_scale, a_v2a_shift = (self.audio_av_table[:4] + mod.audio_av).unbind(2)
            # Each direction's modulated inputs, once and only for the directions that run (A2V: video queries,
            # audio keys/values; V2A: audio queries, video keys/values).
            a2v_q = modulate(nv, v_a2v_scale, v_a2v_shift) if a2v else None
            a2v_kv = modulate(na, a_a2v_scale, a_a2v_shift) if a2v else None
            v2a_q = modulate(na, a_v2a_scale, a_v2a_shift) if v2a else None
            v2a_kv = modulate(nv, v_v2a_scale, v_v2a_shift) if v2a else None
            h_video = h_audio = None  # the A2V / V2A outputs, of the directions that run
            if a2v and v2a:  # both directions: same-modality q/k normed and rotated together (one kernel each)
                h_video, h_audio = exchange_attention(self.a2v, self.v2a, a2v_q, a2v_kv, v2a_q, v2a_kv,
                                                      rope.video_cross, rope.audio_cross)
            elif a2v:
                h_video = self.a2v(a2v_q, a2v_kv, rope.video_cross, rope.audio_cross)
            else:
                h_audio = self.v2a(v2a_q, v2a_kv, rope.audio_cross, rope.video_cross)
            if a2v:
                v = v + (self.video_av_table[AV_GATE:] + mod.video_av_gate).squeeze(2) * h_video  # [B, 1, Dv] gate
            if v2a:
                a_pending = PendingResidual(a, h_audio, *self.audio_gate(mod, AUDIO_V2A_GATE))
        v_ffn = PendingResidual(v, ffn_of(v, self.video_ff, self.video_table, mod.video, eps),
                                *self.video_gate(mod, FFN_GATE))
        return v_ffn, a_pending

    def audio_ffn(self, a: PendingResidual, mod: Modulation) -> PendingResidual:
        x = a.add()
        return PendingResidual(x, ffn_of(x, self.audio_ff, self.audio_table, mod.audio, self.eps),
                               *self.audio_gate(mod, AUDIO_FFN_GATE))


class LTX2Transformer(nn.Module):
    """LTX-2.3 audio-video DiT predicting velocity for video [B, Nv, 128] and audio [B, Na, 128] latents."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        vd, ad = c.video_dim, c.audio_dim
        self.weights_version = 0  # bumped by every weight load; graph keys include it
        self._attention_backend = "auto"
        self._overlap_audio = True
        self._side_streams = SideStreamCache()
        self.video_in = nn.Linear(c.in_channels, vd)
        self.audio_in = nn.Linear(c.audio_in_channels, ad)
        self.video_time = AdaLNSingle(vd, 9)
        self.audio_time = AdaLNSingle(ad, 9)
        self.video_prompt = AdaLNSingle(vd, 2)
        self.audio_prompt = AdaLNSingle(ad, 2)
        self.video_av = AdaLNSingle(vd, 4)
        self.audio_av = AdaLNSingle(ad, 4)
        self.video_av_gate = AdaLNSingle(vd, 1)
        self.audio_av_gate = AdaLNSingle(ad, 1)
        self.blocks = nn.ModuleList(AudioVideoBlock(c) for _ in range(c.num_layers))
        self.video_out_table = nn.Parameter(torch.empty(2, vd))  # rows: shift, scale
        self.audio_out_table = nn.Parameter(torch.empty(2, ad))
        self.video_out = nn.Linear(vd, c.in_channels)
        self.audio_out = nn.Linear(ad, c.audio_in_channels)

    def _apply(self, fn, recurse=True):
        """With FP8 projections (`pipeline.fp8`) a dtype cast is refused before any module changes."""
        if is_quantized(self):
            refuse_casts(fn, self.device)
        return super()._apply(fn, recurse)

    @property
    def attention_backend(self) -> str:
        """SDPA backend used by forward: "auto" (PyTorch picks), "cudnn", "flash", "efficient" or "math"."""
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, value: str) -> None:
        if value not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {sorted(ATTENTION_BACKENDS)}, got {value!r}")
        self._attention_backend = value

    @property
    def overlap_audio(self) -> bool:
        """Run the audio chain on a side CUDA stream next to the video chain (pipeline/streams.py). CUDA only;
        results are identical either way (same kernels, same order within each chain). Off, the blocks keep
        their compile regions (`AudioVideoBlock.compile_regions`)."""
        return self._overlap_audio

    @overlap_audio.setter
    def overlap_audio(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"overlap_audio must be a bool, got {value!r}")
        self._overlap_audio = value

    @property
    def graph_key_extra(self) -> tuple:
        """Host-side settings a graph capture bakes in besides the attention backend (graphs/keys.py)."""
        return (("overlap_audio", self._overlap_audio),)

    def _streams(self) -> AudioStreams:
        device = self.device
        if device.type != "cuda" or not self._overlap_audio:
            return SEQUENTIAL
        return OverlapStreams(self._side_streams.for_device(device))

    @property
    def dtype(self) -> torch.dtype:
        return self.video_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.video_in.weight.device

    def modulation(self, sigma: Tensor) -> tuple[Modulation, Tensor, Tensor]:
        """AdaLN outputs for sigma [B] (or [B, Nv] per video token) plus the output-layer embeddings; the two prompt
        AdaLNs, which only feed the text keys/values, run in `text_kv`.

        LTX-2.3 semantics (the reference pipeline's `use_cross_timestep=True`, `sigma=timestep`): the video
        AdaLN sees the (per-token) video timestep; audio, both prompt AdaLNs and both A2V/V2A AdaLNs see the
        per-sample timestep. With per-token sigma the per-sample value is its max over tokens (the noisy
        tokens' sigma when some are clean conditioning tokens), taken on the device.
        """
        t_video, t_sample = self._timesteps(sigma)
        # One set of sinusoids per distinct timestep, shared by the AdaLNs it feeds (bitwise what each would make).
        s_video = timestep_sinusoid(t_video, self.dtype)
        s_sample = s_video if t_sample is t_video else timestep_sinusoid(t_sample, self.dtype)
        gate_scale = self.config.cross_attn_gate_scale  # 1.0 in LTX-2.3: the gates see the sample's timestep
        s_gate = s_sample if gate_scale == 1.0 else timestep_sinusoid(t_sample * gate_scale, self.dtype)
        video, video_emb = self.video_time(s_video)
        audio, audio_emb = self.audio_time(s_sample)
        v2a_gate = self.audio_av_gate(s_gate)[0][:, :, 0]  # [B, 1, Da]
        audio_gates = torch.stack([audio[:, :, TEXT_GATE], audio[:, :, FFN_GATE], v2a_gate], dim=2)  # AUDIO_*_GATE
        mod = Modulation(
            video=video, audio=audio, video_av=self.video_av(s_sample)[0], audio_av=self.audio_av(s_sample)[0],
            video_av_gate=self.video_av_gate(s_gate)[0], audio_gates=audio_gates,
        )
        return mod, video_emb, audio_emb

    def _timesteps(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(video timestep [B, T], per-sample timestep [B, 1]) for sigma [B] or [B, Nv] (see `modulation`)."""
        b = sigma.shape[0]
        t_video = (sigma * self.config.timestep_scale).view(b, -1)  # [B, T]
        return t_video, t_video if sigma.ndim == 1 else t_video.amax(dim=1, keepdim=True)

    def text_kv(self, video_context: Tensor, audio_context: Tensor, sigma: Tensor) -> tuple[BlockTextKV, ...]:
        """Every block's text keys/values (`BlockTextKV`) for these contexts at this sigma, all blocks batched per
        stream (`pipeline.text_kv`); `forward` calls it unless given them.

        The cond, perturbed and modality passes of one evaluation read the same text at the same sigma, so one
        call here can serve all of them (`forward(text_kv=)`): in LTX-2.3 the prompt AdaLN makes the keys/values
        depend on sigma, so they cannot be kept across steps, but within a step they save the modality and
        perturbed passes their text key/value projections (profiling/PERF_LOG.md has the measured effect). The
        contexts and sigma are checked as `forward` checks them (metadata only); never synchronises the host.
        """
        _check_text_inputs(self, video_context, audio_context, sigma)
        return self._text_kv(video_context, audio_context, sigma)

    def _text_kv(self, video_context: Tensor, audio_context: Tensor, sigma: Tensor) -> tuple[BlockTextKV, ...]:
        """`text_kv` without its input checks (`forward` has made them)."""
        _, t_sample = self._timesteps(sigma)
        s_sample = timestep_sinusoid(t_sample, self.dtype)
        video = stream_text_kv([b.video_text for b in self.blocks], [b.video_prompt_table for b in self.blocks],
                               video_context, self.video_prompt(s_sample)[0])
        audio = stream_text_kv([b.audio_text for b in self.blocks], [b.audio_prompt_table for b in self.blocks],
                               audio_context, self.audio_prompt(s_sample)[0])
        return tuple(BlockTextKV(*v, *a) for v, a in zip(video, audio))

    def _sdpa_context(self):
        backend = ATTENTION_BACKENDS[self._attention_backend]
        return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])

    def forward(self, video: Tensor, audio: Tensor, video_context: Tensor, audio_context: Tensor, sigma: Tensor,
                rope: RopeTables, *, skip_video_self_attn_blocks: Iterable[int] = (),
                skip_audio_self_attn_blocks: Iterable[int] = (), disable_a2v_cross_attn: bool = False,
                disable_v2a_cross_attn: bool = False,
                text_kv: Sequence[BlockTextKV] | None = None) -> tuple[Tensor, Tensor]:
        """Velocity (video [B, Nv, 128], audio [B, Na, 128]) for one guidance pass. Never synchronises the host.

        sigma: float32 [B] (or [B, Nv] per video token). skip_*_self_attn_blocks: STG block indices, any non-string
        iterable of ints (`pipeline.config.block_indices`; value pass-through there). disable_a2v/v2a_cross_attn:
        drop that sublayer and its residual in every block.
        text_kv: `self.text_kv(video_context, audio_context, sigma)` computed ahead, to share between passes
        (the caller keeps it matched to the contexts and sigma); None computes it here first.
        """
        # Normalised once (any iterable of ints, e.g. a one-shot generator, is read here and nowhere else).
        layers = self.config.num_layers
        skip_v = block_indices(skip_video_self_attn_blocks, "skip_video_self_attn_blocks", num_layers=layers)
        skip_a = block_indices(skip_audio_self_attn_blocks, "skip_audio_self_attn_blocks", num_layers=layers)
        validate_inputs(self, video, audio, video_context, audio_context, sigma, rope,
                        disable_a2v_cross_attn=disable_a2v_cross_attn, disable_v2a_cross_attn=disable_v2a_cross_attn,
                        text_kv=text_kv)
        if text_kv is None:
            text_kv = self._text_kv(video_context, audio_context, sigma)
        mod, video_emb, audio_emb = self.modulation(sigma)
        first = self.blocks[0]  # block 0 reads the embedded inputs in the layout of a hand-over (`nothing_pending`)
        v = nothing_pending(self.video_in(video), *first.video_gate(mod, FFN_GATE))  # [B, Nv, Dv]
        a = nothing_pending(self.audio_in(audio), *first.audio_gate(mod, AUDIO_FFN_GATE))  # [B, Na, Da]
        streams = self._streams()
        streams.fork(*a)  # the audio chain starts on the side stream once its inputs and the AdaLN outputs exist
        try:
            with self._sdpa_context():
                for i, block in enumerate(self.blocks):
                    v, a = block(v, a, text_kv[i], mod, rope, skip_video_self_attn=i in skip_v,
                                 skip_audio_self_attn=i in skip_a, a2v=not disable_a2v_cross_attn,
                                 v2a=not disable_v2a_cross_attn, streams=streams)
        finally:
            streams.join()  # also on an error, so no side-stream work is left unjoined (or a capture unjoined)
        v, a = v.add(), a.add()  # the last block's FFN residuals
        shift, scale = (self.video_out_table + video_emb.unsqueeze(2)).unbind(2)  # [B, T, Dv] each
        v = self.video_out(modulate(output_norm(v), scale, shift))  # [B, Nv, 128]
        shift, scale = (self.audio_out_table + audio_emb.unsqueeze(2)).unbind(2)  # [B, 1, Da] each
        a = self.audio_out(modulate(output_norm(a), scale, shift))  # [B, Na, 128]
        return v, a


def _check_tensor(name: str, t: object, shape: tuple[int | None, ...], dtype: torch.dtype,
                  device: torch.device) -> None:
    """Shape (None = any), dtype and device of one input; metadata only."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != len(shape) or any(e is not None and s != e for s, e in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {want}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected the model's device {device}")


def _check_text_inputs(model: LTX2Transformer, video_context: Tensor, audio_context: Tensor, sigma: Tensor, *,
                       batch: int | None = None, video_tokens: int | None = None) -> None:
    """The text contexts (model dtype and device, the model's context widths, one batch size B) and sigma (float32
    [B], or [B, Nv] per video token). `batch`/`video_tokens` pin B and Nv when the latents are known (forward);
    `text_kv` has no latents, so there B is the contexts' and Nv any. Metadata only: never synchronises."""
    c, dtype, device = model.config, model.dtype, model.device
    _check_tensor("video_context", video_context, (batch, None, c.video_context_dim), dtype, device)
    b = video_context.shape[0]
    _check_tensor("audio_context", audio_context, (b, None, c.audio_context_dim), dtype, device)
    for name, t in (("video_context", video_context), ("audio_context", audio_context)):
        if t.shape[1] == 0:
            raise ValueError(f"{name} has shape {list(t.shape)}: no text tokens, expected at least 1")
    per_token = isinstance(sigma, Tensor) and sigma.ndim == 2
    shape = (b, video_tokens) if per_token else (b,)
    if isinstance(sigma, Tensor) and not (sigma.ndim == len(shape) and all(
            e is None or n == e for n, e in zip(sigma.shape, shape))):  # name both forms, not the one guessed
        raise ValueError(f"sigma has shape {list(sigma.shape)}, expected [{b}] (per sample) or "
                         f"[{b}, {'Nv' if video_tokens is None else video_tokens}] (per video token)")
    _check_tensor("sigma", sigma, shape, torch.float32, device)


def validate_inputs(model: LTX2Transformer, video: Tensor, audio: Tensor, video_context: Tensor,
                    audio_context: Tensor, sigma: Tensor, rope: RopeTables, *,
                    disable_a2v_cross_attn: bool = False, disable_v2a_cross_attn: bool = False,
                    text_kv: Sequence[BlockTextKV] | None = None) -> None:
    """Raise ValueError (naming the argument, the value seen and the expected one) for any malformed input (the
    STG block indices are checked where `forward` normalises them, `block_indices`).

    Reads only tensor metadata (shape, dtype, device) and Python values: never synchronises.
    """
    c, dtype, device = model.config, model.dtype, model.device
    backend = model.attention_backend
    if not attention_backend_runs(backend, device, dtype):
        usable = [name for name in ATTENTION_BACKENDS if attention_backend_runs(name, device, dtype)]
        raise ValueError(f"model.attention_backend {backend!r} cannot run on {device.type} with {dtype}; "
                         f"expected one of {usable}")
    _check_tensor("video", video, (None, None, c.in_channels), dtype, device)
    b, nv = video.shape[:2]
    _check_tensor("audio", audio, (b, None, c.audio_in_channels), dtype, device)
    na = audio.shape[1]
    _check_text_inputs(model, video_context, audio_context, sigma, batch=b, video_tokens=nv)
    if not isinstance(rope, RopeTables):
        raise ValueError(f"rope must be RopeTables (pipeline.rope.build_rope_tables), got {type(rope).__name__}")
    rope.check_fits(video, audio)  # before the tables' own shapes: a token mismatch is the latents' fault
    tables = (("video", rope.video, nv, c.video_heads, c.video_head_dim // 2),
              ("audio", rope.audio, na, c.audio_heads, c.audio_head_dim // 2),
              ("video_cross", rope.video_cross, nv, c.video_heads, c.audio_dim // (2 * c.video_heads)),
              ("audio_cross", rope.audio_cross, na, c.audio_heads, c.audio_dim // (2 * c.audio_heads)))
    for name, pair, n, heads, r in tables:
        for t in pair:
            _check_tensor(f"rope.{name}", t, (rope.batch_size, n, heads, r), torch.float32, device)
    for name, flag in (("disable_a2v_cross_attn", disable_a2v_cross_attn),
                       ("disable_v2a_cross_attn", disable_v2a_cross_attn)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    if text_kv is not None:
        _check_text_kv(model, text_kv, {"video": video_context.shape[:2], "audio": audio_context.shape[:2]})


def _check_text_kv(model: LTX2Transformer, text_kv: object, batch_tokens: dict[str, tuple[int, int]]) -> None:
    """`text_kv` must be one `BlockTextKV` per block with [B, Nt, heads * head_dim] keys and values, Nt that of
    the stream's own context (the video and audio texts may differ in length)."""
    c = model.config
    if not isinstance(text_kv, (tuple, list)) or len(text_kv) != c.num_layers:
        got = f"{len(text_kv)} entries" if isinstance(text_kv, (tuple, list)) else type(text_kv).__name__
        raise ValueError(f"text_kv must hold one BlockTextKV per block ({c.num_layers}, from model.text_kv), got {got}")
    widths = {"video": c.video_heads * c.video_head_dim, "audio": c.audio_heads * c.audio_head_dim}
    for i, kv in enumerate(text_kv):
        if not isinstance(kv, BlockTextKV):
            raise ValueError(f"text_kv[{i}] must be a BlockTextKV (from model.text_kv), got {type(kv).__name__}")
        for field, t in kv._asdict().items():
            stream = field.split("_")[0]
            _check_tensor(f"text_kv[{i}].{field}", t, (*batch_tokens[stream], widths[stream]), model.dtype,
                          model.device)


@torch.no_grad()
def init_weights(model: LTX2Transformer, seed: int = 0) -> None:
    """Seeded random init on the model's own device: weights N(0, 1/fan_in), biases N(0, 0.02^2), modulation
    tables N(0, 1/dim), QK-norm weights 1. Keeps activations O(1) through 48 layers (finite in bf16)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_norm", "k_norm"):
            p.fill_(1.0)
        elif leaf == "bias":
            p.normal_(0.0, 0.02, generator=gen)
        else:  # Linear weights [out, in] and modulation tables [rows, dim]
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)


MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def build_model(config: ModelConfig, *, device: torch.device | str, dtype: torch.dtype,
                seed: int = 0) -> LTX2Transformer:
    """Build on the meta device, allocate directly on `device` in `dtype`, then seeded init there.

    Never materialises the model on the CPU first (the 19B preset builds on a GPU in seconds). `device="meta"`
    returns an unallocated model (for key-map checks).
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig (e.g. ModelConfig.preset('tiny')), got {config!r}")
    if dtype not in MODEL_DTYPES:  # float8 is floating point too, but weights are quantized from these (pipeline.fp8)
        raise ValueError(f"dtype must be one of {', '.join(map(str, MODEL_DTYPES))}, got {dtype!r}")
    validate_seed(seed)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device is available (torch.cuda.is_available() is False)")
    with torch.device("meta"):
        model = LTX2Transformer(config)
    model = model.to(dtype)  # still meta: free
    if device.type == "meta":
        return model.eval()
    model = model.to_empty(device=device)
    init_weights(model, seed)
    return model.eval()
