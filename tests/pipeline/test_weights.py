"""Key maps (official <-> ours <-> diffusers) and the safetensors loaders."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.config import LatentGrid, ModelConfig
from pipeline.model import build_model
from pipeline.rope import build_rope_tables
from pipeline.weights import (
    OFFICIAL_PREFIX,
    WeightLoadError,
    diffusers_config,
    diffusers_key_map,
    diffusers_state_dict,
    diffusers_weight_files,
    load_diffusers_transformer,
    load_official_checkpoint,
    load_weights,
    official_key_map,
    official_state_dict,
    save_diffusers_transformer,
    save_official_checkpoint,
)
from tests.pipeline.reference import random_inputs, reference_forward, relative_error

TINY = ModelConfig.preset("tiny")


def _their_shapes(model, key_map):
    """Their name -> the shape our (slice of the) parameter expects."""
    params = dict(model.named_parameters())
    out = {}
    for ours, sources in key_map.items():
        shape = tuple(params[ours].shape)
        for src in sources:
            out[src.name] = shape if src.rows is None else (src.rows[1] - src.rows[0], *shape[1:])
    return out


@pytest.fixture(scope="module")
def big_meta():
    return build_model(ModelConfig.preset("ltx2.3"), device="meta", dtype=torch.bfloat16)


@pytest.mark.parametrize("key_map_fn", [official_key_map, diffusers_key_map])
def test_key_map_covers_every_parameter_exactly_once(big_meta, key_map_fn):
    """Every parameter of the ltx2.3 preset maps; fused row ranges tile their parameter; names are unique."""
    key_map = key_map_fn(big_meta.config)
    params = dict(big_meta.named_parameters())
    assert set(key_map) == set(params)
    names = [src.name for sources in key_map.values() for src in sources]
    assert len(names) == len(set(names))
    for ours, sources in key_map.items():
        if len(sources) == 1 and sources[0].rows is None:
            continue
        starts = [s.rows[0] for s in sources]
        stops = [s.rows[1] for s in sources]
        assert starts[0] == 0 and stops[-1] == params[ours].shape[0] and starts[1:] == stops[:-1], ours


def test_official_names_round_trip_to_diffusers_for_ltx23(big_meta):
    """Official names, renamed by diffusers' own LTX-2.3 converter, are exactly diffusers' names for the same
    tensors, and diffusers' ltx2.3 model (on meta) has exactly those parameters with those shapes."""
    from diffusers import LTX2VideoTransformer3DModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers

    config = big_meta.config
    official, diffusers = official_key_map(config), diffusers_key_map(config)
    ours_to_official = {(o, s.rows): s.name for o, srcs in official.items() for s in srcs}
    ours_to_diffusers = {(o, s.rows): s.name for o, srcs in diffusers.items() for s in srcs}
    assert set(ours_to_official) == set(ours_to_diffusers)
    converted = _convert_non_diffusers_ltx2_lora_to_diffusers(
        {f"diffusion_model.{name}": key for key, name in ours_to_official.items()})
    assert {k.removeprefix("transformer."): v for k, v in converted.items()} == {
        name: key for key, name in ours_to_diffusers.items()}

    with torch.device("meta"):
        reference = LTX2VideoTransformer3DModel(**diffusers_config(config))
    theirs = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    assert theirs == _their_shapes(big_meta, diffusers)


def test_diffusers_load_single_file_and_sharded(tmp_path):
    source = build_model(TINY, device="cpu", dtype=torch.float32, seed=1)
    single = save_diffusers_transformer(source, tmp_path / "single")
    sharded = save_diffusers_transformer(source, tmp_path / "sharded", max_shard_bytes=20_000)
    assert len(diffusers_weight_files(sharded)) > 2
    for path in (single, single / "diffusion_pytorch_model.safetensors", sharded,
                 sharded / "diffusion_pytorch_model.safetensors.index.json"):
        model = build_model(TINY, device="cpu", dtype=torch.float32, seed=2)
        load_diffusers_transformer(model, path)
        assert model.weights_version == 1
        for (name, a), b in zip(source.named_parameters(), model.parameters()):
            assert torch.equal(a, b), name
    assert json.loads((single / "config.json").read_text())["_class_name"] == "LTX2VideoTransformer3DModel"


def test_official_load_ignores_non_dit_keys(tmp_path):
    source = build_model(TINY, device="cpu", dtype=torch.float32, seed=1)
    extra = {"vae.decoder.conv_in.weight": torch.ones(3, 3), "audio_vae.encoder.x": torch.ones(2),
             f"{OFFICIAL_PREFIX}video_embeddings_connector.transformer_1d_blocks.0.ff.net.2.weight": torch.ones(4),
             f"{OFFICIAL_PREFIX}audio_embeddings_connector.learnable_registers": torch.ones(4)}
    path = save_official_checkpoint(source, tmp_path / "ltx-2.3.safetensors", extra=extra)
    with safe_open(path, framework="pt") as f:
        assert "config" in f.metadata()
    model = build_model(TINY, device="cpu", dtype=torch.float32, seed=2)
    load_official_checkpoint(model, path)
    for (name, a), b in zip(source.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    load_weights(model, path)  # auto-detected as official
    assert model.weights_version == 2


def test_load_casts_to_the_model_dtype(tmp_path):
    source = build_model(TINY, device="cpu", dtype=torch.float32, seed=1)
    save_diffusers_transformer(source, tmp_path)
    model = build_model(TINY, device="cpu", dtype=torch.bfloat16, seed=2)
    load_weights(model, tmp_path)
    for (name, a), b in zip(source.named_parameters(), model.parameters()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def _checkpoint_with(tmp_path, edit):
    state = official_state_dict(build_model(TINY, device="cpu", dtype=torch.float32, seed=1))
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, path)
    return path


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.pop(f"{OFFICIAL_PREFIX}transformer_blocks.1.attn1.to_gate_logits.bias"),
     r"1 missing: transformer_blocks\.1\.attn1\.to_gate_logits\.bias \[2\]"),
    (lambda s: s.update({f"{OFFICIAL_PREFIX}caption_projection.linear_1.weight": torch.ones(3, 4)}),
     r"1 unexpected: model\.diffusion_model\.caption_projection\.linear_1\.weight \[3, 4\]"),
    (lambda s: s.update({f"{OFFICIAL_PREFIX}transformer_blocks.0.attn2.to_k.weight": torch.ones(32, 31)}),
     r"1 mis-shaped: model\.diffusion_model\.transformer_blocks\.0\.attn2\.to_k\.weight \[32, 31\] "
     r"\(expected \[32, 32\]\)"),
])
def test_bad_checkpoint_is_rejected_before_anything_is_copied(tmp_path, edit, expected):
    path = _checkpoint_with(tmp_path, edit)
    model = build_model(TINY, device="cpu", dtype=torch.float32, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightLoadError, match=expected):
        load_official_checkpoint(model, path)
    assert model.weights_version == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_all_problems_reported_in_one_error(tmp_path):
    def edit(s):
        s.pop(f"{OFFICIAL_PREFIX}proj_out.bias")
        s.pop(f"{OFFICIAL_PREFIX}transformer_blocks.0.audio_ff.net.2.weight")
        s[f"{OFFICIAL_PREFIX}bogus"] = torch.ones(1)

    with pytest.raises(WeightLoadError) as info:
        load_official_checkpoint(build_model(TINY, device="cpu", dtype=torch.float32),
                                 _checkpoint_with(tmp_path, edit))
    message = str(info.value)
    assert "2 missing" in message and "proj_out.bias [128]" in message and "audio_ff.net.2.weight [16, 64]" in message
    assert "1 unexpected: model.diffusion_model.bogus [1]" in message
    assert isinstance(info.value, ValueError)


def test_non_float_and_float8_sources_are_mis_typed(tmp_path):
    """copy_ would cast ints, bools or float8 into the parameters silently: the header's dtype is checked with the
    names and shapes, and every problem lands in the one error (nothing copied)."""
    int_key, fp8_key = (f"{OFFICIAL_PREFIX}proj_out.weight", f"{OFFICIAL_PREFIX}transformer_blocks.0.attn1.to_q.bias")
    shaped_key = f"{OFFICIAL_PREFIX}transformer_blocks.1.ff.net.2.bias"

    def edit(s):
        s[int_key] = s[int_key].to(torch.int32)
        s[fp8_key] = s[fp8_key].to(torch.float8_e4m3fn)
        s[shaped_key] = torch.ones(3, dtype=torch.bool)  # mis-shaped and mis-typed: listed under both

    model = build_model(TINY, device="cpu", dtype=torch.float32, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightLoadError) as info:
        load_official_checkpoint(model, _checkpoint_with(tmp_path, edit))
    message = str(info.value)
    assert f"1 mis-shaped: {shaped_key} [3] (expected [32])" in message
    assert (f"3 mis-typed: {int_key} I32, {fp8_key} F8_E4M3, {shaped_key} BOOL "  # the file's (sorted) key order
            "(expected one of F16, BF16, F32, F64)") in message
    assert model.weights_version == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_what_cannot_be_loaded_into_or_exported_is_refused_by_name(tmp_path):
    """A meta model (no storage: a load copied into nothing and counted a new weights version), something that is
    not our model (an AttributeError from deep inside), a file that is not safetensors (an error not naming it) and
    `extra` tensors that would overwrite the DiT in an exported checkpoint."""
    path = save_official_checkpoint(build_model(TINY, device="cpu", dtype=torch.float32, seed=1),
                                    tmp_path / "ltx.safetensors")
    meta = build_model(TINY, device="meta", dtype=torch.float32)
    with pytest.raises(WeightLoadError, match="meta device"):
        load_weights(meta, path)
    assert meta.weights_version == 0
    with pytest.raises(WeightLoadError, match="meta device"):
        official_state_dict(meta)
    for not_ours in (torch.nn.Linear(2, 2), None):
        with pytest.raises(ValueError, match="model must be an LTX2Transformer"):
            load_weights(not_ours, path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match=f"{str(garbage)!r} is not a readable safetensors file"):
        load_weights(build_model(TINY, device="cpu", dtype=torch.float32), garbage)
    index = {"weight_map": {"proj_out.weight": "gone.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match=r"shard file\(s\) that do not exist next to it: \['gone.safetensors'\]"):
        load_weights(build_model(TINY, device="cpu", dtype=torch.float32), tmp_path / "model.safetensors.index.json")
    dit_key = f"{OFFICIAL_PREFIX}proj_out.weight"
    with pytest.raises(ValueError, match=f"extra must hold other components' tensors.*{dit_key}"):
        save_official_checkpoint(build_model(TINY, device="cpu", dtype=torch.float32), tmp_path / "x.safetensors",
                                 extra={dit_key: torch.zeros(128, 32)})


def test_half_precision_sources_still_load(tmp_path):
    state = official_state_dict(build_model(TINY, device="cpu", dtype=torch.float32, seed=1))
    state = {k: v.to(torch.bfloat16 if i % 2 else torch.float16) for i, (k, v) in enumerate(state.items())}
    save_file(state, tmp_path / "half.safetensors")
    model = build_model(TINY, device="cpu", dtype=torch.float32, seed=2)
    load_official_checkpoint(model, tmp_path / "half.safetensors")
    assert model.weights_version == 1


@pytest.mark.parametrize("text, match", [
    ('{"metadata": {}}', r"has no \"weight_map\" object .*got an object with keys \['metadata'\]"),
    ('{"weight_map": ["a.safetensors"]}', r"got a \"weight_map\" that is a list"),
    ('{"weight_map": {"x": 1}}', "or has non-string file names"),
    ('["weight_map"]', "got a JSON list"),
    ('{"weight_map": ', "is not valid JSON"),
])
def test_malformed_index_names_the_file(tmp_path, text, match):
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(text)
    for path in (index, tmp_path):
        with pytest.raises(ValueError, match=match) as info:
            diffusers_weight_files(path)
        assert str(index) in str(info.value)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="holds neither"):
        load_diffusers_transformer(build_model(TINY, device="cpu", dtype=torch.float32), tmp_path)
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a .safetensors file"):
        diffusers_weight_files(tmp_path / "model.bin")
    gone = tmp_path / "gone.safetensors"  # was "not a .safetensors file, an .index.json or a directory"
    for load in (load_weights, load_official_checkpoint, load_diffusers_transformer):
        with pytest.raises(ValueError, match=f"path {str(gone)!r} does not exist"):
            load(build_model(TINY, device="cpu", dtype=torch.float32), gone)


def test_official_names_without_the_prefix_load(tmp_path):
    """A DiT saved without `model.diffusion_model.` was read as diffusers and failed with every name listed as
    missing or unexpected; its official names are recognised now."""
    ours = build_model(TINY, device="cpu", dtype=torch.float32, seed=1)
    state = {k.removeprefix(OFFICIAL_PREFIX): v for k, v in official_state_dict(ours).items()}
    save_file(state, tmp_path / "dit.safetensors")
    for load in (load_weights, load_official_checkpoint):
        model = build_model(TINY, device="cpu", dtype=torch.float32, seed=2)
        load(model, tmp_path / "dit.safetensors")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ours.state_dict().values()))


def test_a_key_in_two_shards_is_refused(tmp_path):
    """The last shard read won silently (the index names one file per key)."""
    ours = build_model(TINY, device="cpu", dtype=torch.float32, seed=1)
    save_diffusers_transformer(ours, tmp_path, max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("*-of-*.safetensors"))
    assert len(shards) >= 2
    with safe_open(shards[0], framework="pt") as f:
        first = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(shards[1], framework="pt") as f:
        second = {k: f.get_tensor(k) for k in f.keys()}
    key = next(iter(first))
    save_file({**second, key: first[key] + 7}, shards[1])
    with pytest.raises(WeightLoadError, match=rf"1 in two files: {key} \({shards[0].name}, {shards[1].name}\)"):
        load_weights(build_model(TINY, device="cpu", dtype=torch.float32), tmp_path)


def test_a_checkpoint_of_another_depth_is_named_briefly(tmp_path):
    """12 blocks into a 2-block model listed every key (66 kB of message); now 10 per kind and the block count."""
    deep = build_model(TINY.replace(num_layers=12), device="cpu", dtype=torch.float32)
    path = save_official_checkpoint(deep, tmp_path / "deep.safetensors")
    with pytest.raises(WeightLoadError) as info:
        load_weights(build_model(TINY, device="cpu", dtype=torch.float32), path)
    message = str(info.value)
    assert len(message) < 3000, len(message)
    assert "more)" in message
    assert message.startswith("checkpoint does not match the model: it holds 12 transformer blocks, the model 2 "
                              "(check the preset) (")  # first: the CLI cuts long messages


def test_diffusers_config_refuses_fractional_timestep_scales():
    with pytest.raises(ValueError, match="timestep_scale = 999.6 is not a whole number"):
        diffusers_config(TINY.replace(timestep_scale=999.6))
    assert diffusers_config(TINY)["timestep_scale_multiplier"] == 1000


def test_diffusers_peer_with_our_random_weights_matches():
    """The benchmark's recipe: diffusers' model + diffusers_state_dict(ours) computes what ours computes."""
    from diffusers import LTX2VideoTransformer3DModel

    ours = build_model(TINY, device="cpu", dtype=torch.float32, seed=5)
    with torch.device("meta"):
        peer = LTX2VideoTransformer3DModel(**diffusers_config(TINY))
    peer.load_state_dict(diffusers_state_dict(ours), strict=True, assign=True)
    peer.eval()
    grid = LatentGrid(frames=2, height=2, width=2, audio_tokens=5)
    x = random_inputs(TINY, grid, batch=2)
    with torch.no_grad():
        video, audio = ours(x.video, x.audio, x.video_context, x.audio_context, x.sigma,
                            build_rope_tables(TINY, grid, device="cpu"))
    ref_video, ref_audio = reference_forward(peer, grid, x)
    assert relative_error(video, ref_video) < 1e-5 and relative_error(audio, ref_audio) < 1e-5


def test_state_dicts_are_copies():
    model = build_model(TINY, device="cpu", dtype=torch.float32)
    state = diffusers_state_dict(model)
    state["transformer_blocks.0.attn1.to_q.weight"].zero_()
    assert model.blocks[0].video_self.qkvg.weight.abs().sum() > 0
