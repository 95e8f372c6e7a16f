"""Graph keys: every baked value is a field, keys hash and print, and a miss names what differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from graphs.keys import (
    OWN,
    GraphKey,
    InputSignature,
    ModelIdentity,
    TensorSig,
    TextKVRole,
    WeightsProbe,
    WeightsState,
    explain_miss,
    key_difference,
    nearest_key,
    torch_settings,
)
from pipeline.config import LatentGrid
from pipeline.passes import PassSpec
from tests.graphs.helpers import make_conditioning, make_latents, tiny_model

COND = PassSpec("cond", "positive")
NEG = PassSpec("neg", "negative")
PERTURBED = PassSpec("perturbed", skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,))
MODALITY = PassSpec("modality", disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)


def _setup(tokens: int = 24, audio_tokens: int = 10):
    model = tiny_model()
    grid = LatentGrid.from_tokens(tokens, audio_tokens=audio_tokens)
    conditioning = make_conditioning(model.config, grid, device="cpu")
    video, audio = make_latents(model.config, grid, device="cpu")
    return model, conditioning, video, audio


def _key(spec, model, conditioning, video, audio, compile_mode="off", dtype=torch.bfloat16) -> GraphKey:
    signature = InputSignature.of(video, audio, conditioning, dtype)
    return GraphKey.make(spec, signature, ModelIdentity.of(model), WeightsState.of(model), compile_mode)


def test_tensor_sig_prints_dtype_and_shape():
    assert str(TensorSig((1, 96, 128), torch.bfloat16)) == "bf16[1,96,128]"
    assert str(TensorSig((2,), torch.float32)) == "fp32[2]"
    assert str(TensorSig((3, 4), torch.int64)) == "int64[3,4]"


def test_equal_inputs_give_equal_hashable_keys():
    model, conditioning, video, audio = _setup()
    a = _key(COND, model, conditioning, video, audio)
    b = _key(PassSpec("cond"), model, conditioning, video.clone(), audio.clone())
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert _key(NEG, model, conditioning, video, audio) != a


def test_key_prints_pass_options_and_shapes():
    model, conditioning, video, audio = _setup()
    key = _key(PERTURBED, model, conditioning, video, audio)
    text = str(key)
    assert "perturbed" in text and "skip_video_self_attn_blocks=(1,)" in text
    assert "video bf16[1,24,128]" in text and "audio bf16[1,10,128]" in text
    assert "LTX2Transformer" in text and "compile off" in text
    assert "skip" not in _key(COND, model, conditioning, video, audio).short()


def test_text_kv_role_is_a_key_field_with_its_producer():
    model, conditioning, video, audio = _setup()
    signature = InputSignature.of(video, audio, conditioning, torch.bfloat16)
    identity, weights = ModelIdentity.of(model), WeightsState.of(model)
    own, by_cond, by_perturbed = (GraphKey.make(MODALITY, signature, identity, weights, "off", role)
                                  for role in (OWN, TextKVRole("consume", "cond"), TextKVRole("consume", "perturbed")))
    assert len({own, by_cond, by_perturbed}) == 3
    assert "[reads the positive text K/V held by cond]" in by_cond.short()
    assert "text_kv: 'consume:perturbed' (cached: 'consume:cond')" in explain_miss(by_perturbed, [by_cond])
    assert [TextKVRole(kind).capture_rank for kind in ("own", "produce")] == [0, 1] and by_cond.text_kv_role.consumes
    for kind, producer in (("consume", ""), ("shared", ""), ("own", "cond"), ("produce", "cond")):
        with pytest.raises(ValueError, match="text K/V role must be"):
            TextKVRole(kind, producer)
    with pytest.raises(ValueError, match="text_kv_role must be a TextKVRole"):
        GraphKey.make(MODALITY, signature, identity, weights, "off", "consume:cond")


def test_signature_uses_model_dtype_not_the_callers():
    # The executor casts into static buffers of the model dtype, so fp32 and bf16 latents share a graph.
    model, conditioning, video, audio = _setup()
    assert _key(COND, model, conditioning, video, audio) == _key(COND, model, conditioning, video.bfloat16(),
                                                                  audio.bfloat16())
    fields = _key(COND, model, conditioning, video, audio).fields()
    assert fields["video"] == TensorSig((1, 24, 128), torch.bfloat16)
    assert fields["text[positive].video"] == TensorSig((1, 8, model.config.video_context_dim), torch.bfloat16)
    assert fields["rope.video.0"].dtype == torch.float32  # RoPE keeps its own dtype


def test_explain_miss_names_a_skip_option():
    model, conditioning, video, audio = _setup()
    cached = [_key(s, model, conditioning, video, audio) for s in (COND, NEG, MODALITY)]
    other = PassSpec("perturbed", skip_video_self_attn_blocks=(0,), skip_audio_self_attn_blocks=(1,))
    cached.append(_key(PERTURBED, model, conditioning, video, audio))
    message = explain_miss(_key(other, model, conditioning, video, audio), cached)
    assert "skip_video_self_attn_blocks: (0,) (cached: (1,))" in message
    assert "differs in 1 field(s)" in message
    assert "skip_audio_self_attn_blocks" not in message.split("field(s): ")[1]


def test_explain_miss_names_a_shape_change():
    model, conditioning, video, audio = _setup()
    cached = [_key(COND, model, conditioning, video, audio)]
    _, conditioning2, video2, audio2 = _setup(tokens=48)
    message = explain_miss(_key(COND, model, conditioning2, video2, audio2), cached)
    assert "video: bf16[1,48,128] (cached: bf16[1,24,128])" in message
    assert "rope.video.0" in message  # the RoPE tables changed shape with the grid
    assert "audio:" not in message.split("field(s): ")[1]


def test_explain_miss_names_compile_mode_and_model_fields():
    model, conditioning, video, audio = _setup()
    cached = [_key(COND, model, conditioning, video, audio)]
    message = explain_miss(_key(COND, model, conditioning, video, audio, compile_mode="default"), cached)
    assert "compile: 'default' (cached: 'off')" in message
    model.attention_backend = "math"
    message = explain_miss(_key(COND, model, conditioning, video, audio), cached)
    assert "attention_backend: 'math' (cached: 'auto')" in message
    model.attention_backend = "auto"
    model.overlap_audio = False  # part of the model's graph_key_extra
    message = explain_miss(_key(COND, model, conditioning, video, audio), cached)
    assert "graph_key_extra: (('overlap_audio', False),) (cached: (('overlap_audio', True),))" in message
    model.overlap_audio = True
    other = tiny_model(seed=0)
    message = explain_miss(_key(COND, other, conditioning, video, audio), cached)
    assert "model:" in message and "weight_storage" in message


def test_explain_miss_with_nothing_cached():
    model, conditioning, video, audio = _setup()
    assert "no graph has been captured yet" in explain_miss(_key(COND, model, conditioning, video, audio), [])


def test_nearest_key_prefers_fewest_differences_then_same_pass():
    model, conditioning, video, audio = _setup()
    cond, neg, modality = (_key(s, model, conditioning, video, audio) for s in (COND, NEG, MODALITY))
    # A modality pass at another compile mode differs from the cached modality key in one field only.
    wanted = _key(MODALITY, model, conditioning, video, audio, compile_mode="default")
    assert nearest_key(wanted, [cond, neg, modality]) == modality
    assert [d[0] for d in key_difference(wanted, modality)] == ["compile"]
    assert nearest_key(wanted, []) is None


def test_weights_version_bump_changes_the_state():
    model = tiny_model()
    before = WeightsState.of(model)
    model.weights_version += 1
    after = WeightsState.of(model)
    assert after != before and after.version == before.version + 1


def test_in_place_weight_edit_changes_param_versions():
    model = tiny_model()
    probe = WeightsProbe(model)
    before = probe()
    with torch.no_grad():
        model.blocks[0].video_ff.fc1.weight.add_(1.0)
    after = probe()
    assert after.param_versions == before.param_versions + 1
    assert after.weight_storage == before.weight_storage


def test_in_place_edit_of_fp8_weights_changes_param_versions():
    """FP8 weights are buffers (`Float8Linear.weight_buffers`): editing them in place is an edit of the weights;
    a forward, which only reads them, is not, and other buffers are not counted."""
    from pipeline.fp8 import quantize_fp8

    model = tiny_model()
    quantize_fp8(model)
    probe = WeightsProbe(model)
    before = probe()
    layer = model.blocks[1].video_ff.fc2
    with torch.no_grad():
        layer.weight_scale.mul_(2.0)
    after = probe()
    assert after.param_versions == before.param_versions + 1 and after.weight_storage == before.weight_storage
    with torch.no_grad():
        layer.weight_e4m3.copy_(layer.weight_e4m3.flip(0))
        layer(torch.randn(3, layer.in_features))
    assert probe().param_versions == after.param_versions + 1
    model.video_in.register_buffer("scratch", torch.zeros(1))  # not a weight buffer: edits are not counted
    counted = probe().param_versions
    model.video_in.scratch.add_(1.0)
    assert probe().param_versions == counted


def test_replaced_parameter_changes_storage():
    model = tiny_model()
    probe = WeightsProbe(model)
    before = probe()
    model.video_in.weight = nn.Parameter(model.video_in.weight.detach().clone())
    assert probe().weight_storage != before.weight_storage  # the probe re-reads each parameter slot


def test_swapped_submodule_is_seen():
    """A module swapped in after the probe was made (an adapter wrapping a Linear, a new output head) brings
    parameters the first walk never saw: the probe walks again, so a graph holding the old weights misses."""
    import copy

    model = tiny_model()
    probe = WeightsProbe(model)
    before = probe()
    model.blocks[0].video_ff.fc1 = copy.deepcopy(model.blocks[0].video_ff.fc1)
    after = probe()
    assert after.weight_storage != before.weight_storage and after == WeightsProbe(model)()
    model.video_in.register_buffer("scale", torch.ones(1))  # a buffer added in place counts too
    assert probe() != after and probe() == WeightsProbe(model)()
    scale = model.video_in._buffers.pop("scale")
    model.video_in.register_buffer("renamed", scale)  # same count, another name
    assert probe() == WeightsProbe(model)()
    linear = nn.Linear(2, 2, bias=False)  # a None slot that later holds a tensor
    probe, before = WeightsProbe(linear), WeightsProbe(linear)()
    linear.bias = nn.Parameter(torch.zeros(2))
    assert probe() != before and probe() == WeightsProbe(linear)()


def test_module_code_sees_a_class_changed_in_place_and_an_instance_forward():
    """Neither changes the module tree or the weights, but both change what a capture runs: `fused.is_plain_linear`
    picks its path by `type(module)`, and a `forward` set on an instance replaces the class's."""
    model = tiny_model()
    probe = WeightsProbe(model)
    first = ModelIdentity.of(model, probe)

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model.video_out.__class__ = Doubled
    changed = ModelIdentity.of(model, probe)
    assert changed.module_code != first.module_code and changed == ModelIdentity.of(model)
    model.audio_out.forward = lambda x: x
    patched = ModelIdentity.of(model, probe)
    assert patched.module_code not in (first.module_code, changed.module_code)
    del model.audio_out.forward
    assert ModelIdentity.of(model, probe) == changed and probe() == WeightsState.of(model)

    @dataclasses.dataclass  # unhashable (eq without frozen): compared by identity, like any instance forward
    class Scaled:
        scale: float

        def __call__(self, x):
            return self.scale * x

    model.audio_out.forward = Scaled(2.0)
    assert ModelIdentity.of(model, probe).module_code not in (first.module_code, changed.module_code)
    del model.audio_out.forward
    model.video_out.__class__ = nn.Linear
    assert ModelIdentity.of(model, probe) == first


def test_cuda_autocast_is_a_key_field(monkeypatch):
    """Autocast is thread-local state a capture bakes in (a float32 model's matmuls run in bf16 under it)."""
    model, conditioning, video, audio = _setup()
    plain = _key(COND, model, conditioning, video, audio)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
    under = _key(COND, model, conditioning, video, audio)
    assert key_difference(under, plain) == [("torch.autocast_cuda", "torch.bfloat16", False)]


def test_probe_tolerates_inference_tensors():
    with torch.inference_mode():
        model = nn.Linear(2, 2)
    assert WeightsProbe(model)().param_versions == 0


def _flip_getter(monkeypatch, name):
    value = getattr(torch.backends.cuda, name)()
    monkeypatch.setattr(torch.backends.cuda, name, lambda: not value)


_MATMUL, _CONV = torch.backends.cuda.matmul, torch.backends.cudnn.conv
SWITCHES = {  # every kernel switch `torch_settings` keys on, each flipped
    "sdp_cudnn": lambda mp: _flip_getter(mp, "cudnn_sdp_enabled"),
    "sdp_efficient": lambda mp: _flip_getter(mp, "mem_efficient_sdp_enabled"),
    "sdp_math": lambda mp: _flip_getter(mp, "math_sdp_enabled"),
    "blas": lambda mp: mp.setattr(torch.backends.cuda, "preferred_blas_library", lambda *a: "_BlasBackend.Cublaslt"),
    "cudnn_fp32_precision": lambda mp: mp.setattr(_CONV, "fp32_precision",
                                                  "ieee" if _CONV.fp32_precision != "ieee" else "tf32"),
    "matmul_bf16_reduced_reduction": lambda mp: mp.setattr(
        _MATMUL, "allow_bf16_reduced_precision_reduction", not _MATMUL.allow_bf16_reduced_precision_reduction),
    "matmul_fp16_reduced_reduction": lambda mp: mp.setattr(
        _MATMUL, "allow_fp16_reduced_precision_reduction", not _MATMUL.allow_fp16_reduced_precision_reduction),
}


@pytest.mark.parametrize("field", sorted(SWITCHES))
def test_every_kernel_switch_is_a_key_field(monkeypatch, field):
    """Beyond the three switches `test_torch_kernel_settings_are_part_of_the_key` flips end to end (flash SDPA,
    TF32 matmul, deterministic): dropping any of these from the key went unnoticed."""
    before = dict(torch_settings())
    SWITCHES[field](monkeypatch)
    after = dict(torch_settings())
    assert field in before and after[field] != before[field], (field, before.get(field), after.get(field))


def test_a_parameter_added_after_the_walk_changes_the_weights_state():
    model = tiny_model()
    probe = WeightsProbe(model)
    before = probe()
    model.video_out.register_parameter("lora_scale", nn.Parameter(torch.ones(1)))
    assert not probe().same_weights(before)
