"""Analytic FLOP count of one transformer pass, from the model config, the token grid and the pass's skip options.

Why analytic: a profiler's FLOP counter sees only what it can attribute (it misses fused or compiled kernels and
double counts nothing consistently across executors), while the benchmark needs ONE number per pass that every
executor row (ours, compiled, graphed, diffusers') divides by its time. The count covers the matrix multiplies
(GEMMs) and the attention products, which are >99.9% of the work; elementwise ops (norms, modulation, gates,
RoPE, GELU) and the per-sample AdaLN MLPs are left out and documented as such.

Formula (batch B, N video tokens, M audio tokens, T text tokens; Dv/Da hidden widths, Hv/Ha heads, Cv/Ca text
context widths, Fv/Fa FFN widths; gemm(m, n, k) = 2*m*n*k multiply-adds counted as 2 FLOPs; per block):

    video self-attn   q, k, v, out: 4*gemm(N, Dv, Dv)  gate logits: gemm(N, Hv, Dv)   QK^T + PV: 2*gemm(N, N, Dv)
    video text attn   q, out: 2*gemm(N, Dv, Dv)  k, v: 2*gemm(T, Dv, Cv)  gate: gemm(N, Hv, Dv)
                      QK^T + PV: 2*gemm(N, T, Dv)
    audio self/text   the same with M, Da, Ha, Ca
    A2V (Q video)     q: gemm(N, Da, Dv)  k, v: 2*gemm(M, Da, Da)  out: gemm(N, Dv, Da)  gate: gemm(N, Ha, Dv)
                      QK^T + PV: 2*gemm(N, M, Da)
    V2A (Q audio)     q, out: 2*gemm(M, Da, Da)  k, v: 2*gemm(N, Da, Dv)  gate: gemm(M, Ha, Da)
                      QK^T + PV: 2*gemm(M, N, Da)
    FFN               video 2*gemm(N, Fv, Dv), audio 2*gemm(M, Fa, Da)

plus the patchify and output projections (128 channels in and out). Pass options remove work: a block in
`skip_*_self_attn_blocks` (STG) computes only v, the gate and out of that self-attention (no q, k, QK^T, PV);
`disable_a2v_cross_attn` / `disable_v2a_cross_attn` remove that whole sublayer in every block.
For the ltx2.3 preset with 1024 text and 126 audio tokens the cond pass is 48.0 TFLOP at 1536 video tokens
(44.7 GEMM + 3.3 attention) and 275.4 TFLOP at 8160 (215.6 + 59.8); the modality pass 42.7 and 248.0.
`tests/graphs/test_bench_flops.py` checks the formula against torch's FLOP counter on the tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass


def gemm(m: int, n: int, k: int) -> int:
    """FLOPs of an [m, k] x [k, n] matrix product (a multiply-add counts as 2)."""
    return 2 * m * n * k


@dataclass(frozen=True)
class TransformerDims:
    """The widths the FLOP formula needs, read off a model config (`dims_from_config`)."""

    layers: int
    video_dim: int
    audio_dim: int
    video_heads: int
    audio_heads: int
    video_context_dim: int
    audio_context_dim: int
    video_ffn_dim: int
    audio_ffn_dim: int
    video_in_channels: int = 128
    audio_in_channels: int = 128


@dataclass(frozen=True)
class PassShape:
    """Token counts of one pass: batch, video, audio and text tokens."""

    video_tokens: int
    audio_tokens: int
    text_tokens: int
    batch: int = 1


@dataclass(frozen=True)
class PassFlops:
    """FLOPs of one pass split into GEMM (projections, FFN) and attention (QK^T and PV) work."""

    gemm: int
    attention: int

    @property
    def total(self) -> int:
        return self.gemm + self.attention


def _self_attention(tokens: int, dim: int, heads: int, skipped: bool) -> PassFlops:
    v_out_gate = 2 * gemm(tokens, dim, dim) + gemm(tokens, heads, dim)
    if skipped:  # STG: out = to_out(v); q, k and the attention products are not computed
        return PassFlops(v_out_gate, 0)
    return PassFlops(v_out_gate + 2 * gemm(tokens, dim, dim), 2 * gemm(tokens, tokens, dim))


def _text_attention(tokens: int, dim: int, heads: int, text: int, context_dim: int, kv_projected: bool) -> PassFlops:
    """`kv_projected` False: the pass reads text keys/values another pass projected (shared within an evaluation)."""
    kv = 2 * gemm(text, dim, context_dim) if kv_projected else 0
    projections = 2 * gemm(tokens, dim, dim) + kv + gemm(tokens, heads, dim)
    return PassFlops(projections, 2 * gemm(tokens, text, dim))


def _cross_modal_attention(q_tokens: int, q_dim: int, kv_tokens: int, kv_dim: int, inner: int, heads: int) -> PassFlops:
    """Queries from one stream, keys/values from the other; inner width = the audio width for both directions."""
    projections = (
        gemm(q_tokens, inner, q_dim)  # to_q
        + 2 * gemm(kv_tokens, inner, kv_dim)  # to_k, to_v
        + gemm(q_tokens, q_dim, inner)  # to_out
        + gemm(q_tokens, heads, q_dim)  # per-head gate logits
    )
    return PassFlops(projections, 2 * gemm(q_tokens, kv_tokens, inner))


def _add(*parts: PassFlops) -> PassFlops:
    return PassFlops(sum(p.gemm for p in parts), sum(p.attention for p in parts))


def pass_flops(
    dims: TransformerDims,
    shape: PassShape,
    *,
    skip_video_self_attn_blocks: tuple[int, ...] = (),
    skip_audio_self_attn_blocks: tuple[int, ...] = (),
    disable_a2v_cross_attn: bool = False,
    disable_v2a_cross_attn: bool = False,
    text_kv_projected: bool = True,
) -> PassFlops:
    """FLOPs of one transformer call with the given pass options (the keyword names match `PassSpec`);
    `text_kv_projected` False leaves out the text key/value projections of a pass that reads shared ones."""
    n, m, t = shape.video_tokens, shape.audio_tokens, shape.text_tokens
    d = dims
    blocks: list[PassFlops] = []
    for index in range(d.layers):
        parts = [
            _self_attention(n, d.video_dim, d.video_heads, index in skip_video_self_attn_blocks),
            _text_attention(n, d.video_dim, d.video_heads, t, d.video_context_dim, text_kv_projected),
            _self_attention(m, d.audio_dim, d.audio_heads, index in skip_audio_self_attn_blocks),
            _text_attention(m, d.audio_dim, d.audio_heads, t, d.audio_context_dim, text_kv_projected),
            PassFlops(2 * gemm(n, d.video_ffn_dim, d.video_dim) + 2 * gemm(m, d.audio_ffn_dim, d.audio_dim), 0),
        ]
        if not disable_a2v_cross_attn:
            parts.append(_cross_modal_attention(n, d.video_dim, m, d.audio_dim, d.audio_dim, d.audio_heads))
        if not disable_v2a_cross_attn:
            parts.append(_cross_modal_attention(m, d.audio_dim, n, d.video_dim, d.audio_dim, d.audio_heads))
        blocks.append(_add(*parts))
    io = PassFlops(
        2 * gemm(n, d.video_dim, d.video_in_channels) + 2 * gemm(m, d.audio_dim, d.audio_in_channels), 0
    )  # patchify in + projection out, each stream
    total = _add(io, *blocks)
    return PassFlops(total.gemm * shape.batch, total.attention * shape.batch)


def dims_from_config(config) -> TransformerDims:
    """The FLOP formula's widths for a `pipeline.config.ModelConfig`."""
    return TransformerDims(
        layers=config.num_layers,
        video_dim=config.video_dim,
        audio_dim=config.audio_dim,
        video_heads=config.video_heads,
        audio_heads=config.audio_heads,
        video_context_dim=config.video_context_dim,
        audio_context_dim=config.audio_context_dim,
        video_ffn_dim=config.video_dim * config.ffn_mult,
        audio_ffn_dim=config.audio_dim * config.ffn_mult,
        video_in_channels=config.in_channels,
        audio_in_channels=config.audio_in_channels,
    )


def spec_flops(config, grid, text_tokens: int, spec, *, batch: int = 1, text_kv_projected: bool = True) -> PassFlops:
    """FLOPs of the pass `spec` (a `PassSpec`) on `grid` (a `LatentGrid`) for the model `config`."""
    shape = PassShape(grid.num_video_tokens, grid.num_audio_tokens, text_tokens, batch)
    return pass_flops(dims_from_config(config), shape, **spec.model_kwargs(), text_kv_projected=text_kv_projected)
