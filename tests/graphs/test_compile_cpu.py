"""Regional compile plumbing on CPU (dynamo with the "eager" backend, so no inductor build): one compiled
block structure shared by all blocks, variants bounded and counted, recompiles outside warm-up an error,
blocks left uncompiled outside the contexts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from torch import nn

from graphs.compile import CompiledBlocks, CompiledExecutor, compile_mode_name, find_blocks
from graphs.errors import CaptureError
from pipeline.config import LatentGrid, ModelConfig
from pipeline.executor import EagerExecutor, PassExecutor
from pipeline.model import AudioVideoBlock, build_model
from pipeline.passes import PassSpec
from tests.graphs.helpers import make_conditioning, make_latents, tiny_model

COND = PassSpec("cond")
MODALITY = PassSpec("modality", disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    grid = LatentGrid.from_tokens(8, audio_tokens=4)
    return model, grid


def _forward(model, grid, spec, tokens: int | None = None):
    if tokens is not None:
        grid = LatentGrid.from_tokens(tokens, audio_tokens=grid.audio_tokens)
    conditioning = make_conditioning(model.config, grid, device="cpu")
    video, audio = make_latents(model.config, grid, device="cpu")
    text = conditioning.texts[spec.text]
    sigma = torch.full((1,), 0.5)
    with torch.no_grad():
        return model(video, audio, text.video, text.audio, sigma, conditioning.rope, **spec.model_kwargs())


@pytest.mark.parametrize("value, name", [(False, "off"), (None, "off"), ("off", "off"), (True, "default"),
                                         ("default", "default"),
                                         ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_mode_names(value, name):
    assert compile_mode_name(value) == name


@pytest.mark.parametrize("value", ["reduce-overhead", "max-autotune", "fast", 1.0])
def test_modes_with_inductor_cudagraphs_or_unknown_are_refused(value):
    with pytest.raises(ValueError, match="compile must be"):
        compile_mode_name(value)


def test_find_blocks(tiny):
    model, _ = tiny
    assert find_blocks(model) == list(model.blocks)
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    mixed = nn.Module()
    mixed.layers = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)])
    mixed.heads = nn.ModuleList([nn.ReLU(), nn.ReLU()])
    assert len(find_blocks(mixed)) == 2  # only same-class lists count
    mixed._repeated_blocks = ["Linear"]
    with pytest.raises(ValueError, match=r"looked for classes \['Linear'\]"):
        find_blocks(mixed)


def test_one_structure_serves_every_block_and_variants_are_counted(tiny, fresh_dynamo):
    model, grid = tiny
    eager_cond = _forward(model, grid, COND)
    blocks = CompiledBlocks(model, "default", backend="eager")
    with blocks.compiling():
        compiled_cond = _forward(model, grid, COND)
    regions = AudioVideoBlock.compile_regions
    assert blocks.regions == regions == ("video_attention", "audio_attention", "exchange_and_video_ffn", "audio_ffn")
    # One graph per region, shared by both blocks: block 0 reads the embedded inputs as hand-overs that add zero
    # (`nothing_pending`), in the layout of the residuals later blocks receive (`PendingResidual`). The text
    # keys/values of all blocks come in computed (not compiled).
    assert blocks.compiles == 4
    assert blocks.cached_variants() == dict.fromkeys(regions, 1)
    torch.testing.assert_close(compiled_cond, eager_cond)
    with blocks.compiling():
        # a2v/v2a off: one more variant of the exchange region only; the audio FFN region receives the text
        # residual instead of the V2A one, in the same layout (`Modulation.audio_gates`)
        _forward(model, grid, MODALITY)
        _forward(model, grid, COND)  # cached
    assert blocks.compiles == 5
    assert blocks.cached_variants() == {**dict.fromkeys(regions, 1), "exchange_and_video_ffn": 2}
    for b in model.blocks:  # eager outside the contexts
        assert b._compiled_call_impl is None and not set(regions) & set(vars(b))


def test_a_compiled_forward_region_keeps_the_blocks_hooks(fresh_dynamo):
    """Blocks without `compile_regions` compile their whole forward; the block's forward hooks still run around
    it, as in eager (graph keys include the hooks; they were skipped under compile)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    model = nn.Module()
    model.blocks = nn.ModuleList([Block(), Block()])
    calls = []
    model.blocks[1].register_forward_hook(lambda module, args, out: calls.append(1) or out * 2)
    x = torch.randn(2, 4)

    def run():
        with torch.no_grad():
            return model.blocks[1](model.blocks[0](x))

    eager = run()
    blocks = CompiledBlocks(model, "default", backend="eager")
    assert blocks.regions == ("forward",)
    with blocks.compiling():
        compiled = run()
    assert calls == [1, 1] and blocks.compiles == 1
    torch.testing.assert_close(compiled, eager)
    assert all("forward" not in vars(b) for b in model.blocks)  # eager again outside the context


def test_deeper_models_compile_no_more_variants(fresh_dynamo):
    """A hand-over carries its block's AdaLN gate row: an input, not a per-block recompile."""
    model = build_model(dataclasses.replace(ModelConfig.preset("tiny"), num_layers=4), device="cpu",
                        dtype=torch.float32, seed=0)
    grid = LatentGrid.from_tokens(8, audio_tokens=4)
    blocks = CompiledBlocks(model, "default", backend="eager")
    with blocks.compiling():
        _forward(model, grid, COND)
    assert blocks.cached_variants()["video_attention"] == 1 and blocks.compiles == 4


def test_under_autograd_block_0_compiles_no_variant_of_its_own(tiny, fresh_dynamo):
    """With autograd recording, later blocks' hand-overs require grad; block 0's zero hand-over does too
    (`nothing_pending`), so dynamo's requires_grad guard does not split off a block-0 variant."""
    model, grid = tiny
    conditioning = make_conditioning(model.config, grid, device="cpu")
    video, audio = make_latents(model.config, grid, device="cpu")
    text = conditioning.texts[COND.text]
    blocks = CompiledBlocks(model, "default", backend="eager")
    with blocks.compiling():
        v, a = model(video, audio, text.video, text.audio, torch.full((1,), 0.5), conditioning.rope)
    (v.sum() + a.sum()).backward()
    assert blocks.cached_variants() == dict.fromkeys(AudioVideoBlock.compile_regions, 1)
    assert model.blocks[0].audio_av_table.grad is not None
    model.zero_grad(set_to_none=True)


def test_frozen_runs_cached_variants_and_refuses_recompiles(tiny, fresh_dynamo):
    model, grid = tiny
    blocks = CompiledBlocks(model, "default", backend="eager")
    with blocks.compiling():
        _forward(model, grid, COND)
    with blocks.frozen():
        _forward(model, grid, COND)
    with pytest.raises(CaptureError, match="recompile a block outside warm-up"):
        with blocks.frozen():
            _forward(model, grid, COND, tokens=12)
    assert all(b._compiled_call_impl is None for b in model.blocks)


def test_variant_limit_is_an_error_not_an_eager_fallback(tiny, fresh_dynamo):
    model, grid = tiny
    blocks = CompiledBlocks(model, "default", backend="eager", max_variants=2)
    with blocks.compiling():
        _forward(model, grid, COND)
        _forward(model, grid, MODALITY)  # the exchange region's second variant
    with pytest.raises(CaptureError, match="more than 2 variants of the 2 AudioVideoBlock blocks"):
        with blocks.compiling():
            _forward(model, grid, COND, tokens=12)  # a third exchange variant


def _exception(type_name: str, message: str) -> Exception:
    """An exception of a class named like one of dynamo's (the predicate matches types by name)."""
    return type(type_name, (RuntimeError,), {})(message)


@pytest.mark.parametrize("error, limit, any_refusal", [
    (_exception("FailOnRecompileLimitHit", "Hard failure due to fail_on_recompile_limit_hit"), True, True),
    (_exception("FailOnRecompileLimitHit", "Hard failure due to fullgraph=True"), True, True),
    (RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'. filename: 'x.py'"),
     False, True),
    (_exception("RecompileError", "Recompiling function forward"), False, True),
    (ValueError("torch._dynamo.config has no recompile_limit"), False, False),  # mentions the limit, is not a hit
    (RuntimeError("shape mismatch"), False, False),
])
def test_one_recompile_predicate_for_the_variant_limit_and_the_frozen_stance(error, limit, any_refusal):
    from graphs.compile import _is_recompile_error

    assert _is_recompile_error(error, limit_only=True) is limit  # compiling(): "too many variants"
    assert _is_recompile_error(error) is any_refusal  # frozen(): "recompile outside warm-up"


def test_compiling_reports_only_a_limit_hit_as_too_many_variants(tiny, fresh_dynamo):
    model, grid = tiny
    blocks = CompiledBlocks(model, "default", backend="eager")
    with pytest.raises(ValueError, match="recompile_limit"):  # not turned into a variant-budget error
        with blocks.compiling():
            raise ValueError("torch._dynamo.config has no recompile_limit")
    with blocks.compiling():
        _forward(model, grid, COND)
    # compiling() inside frozen(): the stance refuses the new shape; that is frozen's error, not a spent budget
    with pytest.raises(CaptureError, match="recompile a block outside warm-up"):
        with blocks.frozen(), blocks.compiling():
            _forward(model, grid, COND, tokens=12)


def test_each_instance_gets_its_own_variant_budget_per_region(tiny, fresh_dynamo):
    """Regions hold different numbers of cached variants (the exchange region one per a2v/v2a setting, the FFN
    regions one); a second instance at a new shape still gets `max_variants` new ones in every region."""
    model, grid = tiny
    first = CompiledBlocks(model, "default", backend="eager", max_variants=2)
    with first.compiling():
        _forward(model, grid, COND)
        _forward(model, grid, MODALITY)
    other = tiny_model(seed=1)
    second = CompiledBlocks(other, "default", backend="eager", max_variants=2)
    with second.compiling():
        _forward(other, grid, COND, tokens=12)
        _forward(other, grid, MODALITY, tokens=12)
    assert second.cached_variants()["exchange_and_video_ffn"] == 4


def test_regions_are_removed_when_an_error_escapes(tiny, fresh_dynamo):
    model, grid = tiny
    blocks = CompiledBlocks(model, "default", backend="eager")
    with blocks.compiling():
        _forward(model, grid, COND)
        with pytest.raises(CaptureError):  # nested: the inner exit keeps the outer context's regions
            with blocks.frozen():
                assert all("video_attention" in vars(b) for b in model.blocks)
                _forward(model, grid, COND, tokens=12)
        assert all("video_attention" in vars(b) for b in model.blocks)
    for b in model.blocks:
        assert b._compiled_call_impl is None and not set(AudioVideoBlock.compile_regions) & set(vars(b))


def test_bad_compiled_blocks_arguments(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="mode must be one of"):
        CompiledBlocks(model, "off")
    with pytest.raises(ValueError, match="max_variants must be >= 1"):
        CompiledBlocks(model, "default", max_variants=0)


def test_inductor_padding_and_cudagraphs_are_off_while_compiling(tiny):
    """Padded GEMM outputs cost a bias copy per projection, and benchmark-decided GEMM padding makes the compiled
    graph differ between machines (graphs/compile.py docstring); restored afterwards."""
    import torch._inductor.config as inductor_config

    model, _ = tiny
    settings = ("comprehensive_padding", "shape_padding", "triton.cudagraphs")
    read = lambda: tuple(inductor_config.get_config_copy()[name] for name in settings)  # noqa: E731
    before = read()
    blocks = CompiledBlocks(model, "default")
    with blocks.compiling():
        assert read() == (False, False, False)
    assert read() == before


def test_compiled_executor_runs_passes_with_compiled_blocks(tiny, fresh_dynamo):
    model, grid = tiny
    conditioning = make_conditioning(model.config, grid, device="cpu")
    video, audio = make_latents(model.config, grid, device="cpu")
    executor = CompiledExecutor(model, "default", backend="eager")
    assert isinstance(executor, PassExecutor)
    eager = EagerExecutor(model)
    for ex in (executor, eager):
        ex.set_conditioning(conditioning)
    with torch.no_grad():
        ours = executor.run(video, audio, 0.5, (COND, MODALITY))
        theirs = eager.run(video, audio, 0.5, (COND, MODALITY))
    for name in ("cond", "modality"):
        torch.testing.assert_close(ours[name].video, theirs[name].video)
    assert executor.blocks.compiles == 5  # the 4 regions for cond, the exchange region again for modality
    with pytest.raises(ValueError, match="needs a compile mode"):
        CompiledExecutor(model, False)
