"""Guidance: parameters and presets as validated data; the combine equals the formula for every on/off mix."""

import itertools
import math

import pytest
import torch

from pipeline.guidance import PRESET_NAMES, GuidanceConfig, GuidanceParams, combine
from pipeline.passes import pass_specs_for


def formula(cond, neg, perturbed, modality, cfg, stg, rescale, mod):
    """LTX2_REFERENCE section 3 in float64, missing passes as the reference's 0.0; std per batch item."""
    pred = cond + (cfg - 1) * (cond - neg) + stg * (cond - perturbed) + (mod - 1) * (cond - modality)
    if rescale != 0:
        std = lambda t: t.flatten(1).std(dim=1).view(-1, 1, 1)  # noqa: E731
        pred = pred * (rescale * std(cond) / std(pred) + (1 - rescale))
    return pred


def _x0s(seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, 24, 16, generator=g) for name in ("cond", "neg", "perturbed", "modality")}


COMBOS = list(itertools.product([1.0, 3.0], [0.0, 1.5], [1.0, 3.0], [0.0, 0.45, 1.0]))


@pytest.mark.parametrize("cfg,stg,mod,rescale", COMBOS)
def test_combine_equals_formula(cfg, stg, mod, rescale):
    x0 = _x0s(hash((cfg, stg, mod, rescale)) % 1000)
    params = GuidanceParams(cfg=cfg, stg=stg, rescale=rescale, modality=mod)
    present = {"cond": x0["cond"]}
    for name, needed in (("neg", params.needs_neg), ("perturbed", params.needs_perturbed),
                         ("modality", params.needs_modality)):
        if needed:
            present[name] = x0[name]
    got = combine(params, present)
    d = {k: v.double() for k, v in x0.items()}
    missing = torch.zeros_like(d["cond"])
    want = formula(
        d["cond"],
        d["neg"] if params.needs_neg else missing,
        d["perturbed"] if params.needs_perturbed else missing,
        d["modality"] if params.needs_modality else missing,
        cfg, stg, rescale, mod,
    )
    assert got.dtype == torch.float32 and got.shape == x0["cond"].shape
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


def test_identity_returns_cond():
    x0 = _x0s(0)
    torch.testing.assert_close(combine(GuidanceParams(), {"cond": x0["cond"]}), x0["cond"], rtol=0, atol=0)


def test_batch_one_matches_whole_tensor_std():
    """At batch 1 the per-item std is the reference's whole-tensor std."""
    x0 = _x0s(1, batch=1)
    params = GuidanceParams(cfg=3.0, rescale=0.7)
    pred = x0["cond"] + 2.0 * (x0["cond"] - x0["neg"])
    want = pred * (0.7 * x0["cond"].std() / pred.std() + 0.3)
    torch.testing.assert_close(combine(params, {"cond": x0["cond"], "neg": x0["neg"]}), want)


def test_batch_items_are_independent():
    x0 = _x0s(2, batch=3)
    params = GuidanceParams(cfg=3.0, rescale=1.0, modality=2.0)
    full = combine(params, x0)
    for i in range(3):
        one = combine(params, {k: v[i : i + 1] for k, v in x0.items()})
        torch.testing.assert_close(full[i : i + 1], one)


def test_bf16_inputs_combined_in_fp32():
    x0 = {k: v.bfloat16() for k, v in _x0s(3).items()}
    out = combine(GuidanceParams(cfg=3.0, rescale=0.5), x0)
    assert out.dtype == torch.float32


def test_missing_needed_pass():
    with pytest.raises(ValueError, match="'neg'"):
        combine(GuidanceParams(cfg=3.0), {"cond": torch.zeros(1, 2, 2)})
    with pytest.raises(ValueError, match="'cond'"):
        combine(GuidanceParams(), {"neg": torch.zeros(1, 2, 2)})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cfg": float("nan")}, "cfg"),
        ({"stg": float("inf")}, "stg"),
        ({"modality": "3"}, "modality"),
        ({"cfg": True}, "cfg"),
        ({"rescale": 1.5}, "rescale"),
        ({"rescale": -0.1}, "rescale"),
    ],
)
def test_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidanceParams(**kwargs)


def test_config_validation():
    stg = GuidanceParams(stg=1.0)
    with pytest.raises(ValueError, match="stg_blocks is empty"):
        GuidanceConfig(video=stg)
    with pytest.raises(ValueError, match=r"GuidanceConfig.stg_blocks contains -1; expected block indices >= 0"):
        GuidanceConfig(video=stg, stg_blocks=(-1,))
    with pytest.raises(ValueError, match="GuidanceConfig.stg_blocks has duplicates"):
        GuidanceConfig(video=stg, stg_blocks=(3, 3))
    with pytest.raises(ValueError, match="GuidanceConfig.stg_blocks must be a non-string iterable .* got int 28"):
        GuidanceConfig(video=stg, stg_blocks=28)
    with pytest.raises(ValueError, match="GuidanceParams"):
        GuidanceConfig(video={"cfg": 3.0})
    config = GuidanceConfig(video=stg, stg_blocks=[5, 2])
    assert config.stg_blocks == (2, 5)
    config.validate(num_layers=6)
    with pytest.raises(ValueError, match=r"out of range for a model with 4 layers.*\[5\]"):
        config.validate(num_layers=4)
    GuidanceConfig(stg_blocks=(99,)).validate(num_layers=2)  # unused blocks (stg == 0) are not checked


def test_presets():
    hq, dev = GuidanceConfig.preset("hq"), GuidanceConfig.preset("dev")
    assert hq.video == GuidanceParams(cfg=3.0, stg=0.0, rescale=0.45, modality=3.0)
    assert hq.audio == GuidanceParams(cfg=7.0, stg=0.0, rescale=1.0, modality=3.0)
    assert dev.video == GuidanceParams(cfg=3.0, stg=1.0, rescale=0.7, modality=3.0)
    assert dev.audio == GuidanceParams(cfg=7.0, stg=1.0, rescale=0.7, modality=3.0)
    assert dev.stg_blocks == (28,)
    assert [s.name for s in pass_specs_for(hq)] == ["cond", "neg", "modality"]
    assert [s.name for s in pass_specs_for(dev)] == ["cond", "neg", "perturbed", "modality"]
    dev.validate(num_layers=48)
    with pytest.raises(ValueError, match="out of range"):
        dev.validate(num_layers=2)
    assert set(PRESET_NAMES) == {"hq", "dev"}
    assert hash(hq) == hash(GuidanceConfig.preset("hq"))
    with pytest.raises(ValueError, match="unknown guidance preset 'fast'"):
        GuidanceConfig.preset("fast")


def test_full_rescale_restores_cond_std():
    """rescale = 1 gives each item exactly the std of its cond x0."""
    x0 = _x0s(4)
    pred = combine(GuidanceParams(cfg=2.0, rescale=1.0), {"cond": x0["cond"], "neg": x0["neg"]})
    ratio = pred.flatten(1).std(dim=1) / x0["cond"].flatten(1).std(dim=1)
    assert torch.allclose(ratio, torch.ones(2), atol=1e-5)
    assert math.isfinite(pred.abs().max().item())


def test_fitted_to_moves_out_of_range_stg_blocks_to_the_last_block():
    dev = GuidanceConfig.preset("dev")  # STG on block 28 of the 48-layer model
    same, note = dev.fitted_to(48)
    assert same is dev and note is None
    fitted, note = dev.fitted_to(4)
    assert fitted.stg_blocks == (3,) and fitted.video == dev.video and fitted.audio == dev.audio
    assert "28" in note and "block 3" in note
    hq = GuidanceConfig.preset("hq")  # no STG blocks: nothing to fit
    assert hq.fitted_to(2) == (hq, None)


@pytest.mark.parametrize("blocks, layers, fitted, missing", [
    ((1, 28), 4, (1, 3), "[28]"),  # block 1 exists: kept, and not named in the note
    ((1, 28, 40), 4, (1, 3), "[28, 40]"),  # two missing blocks become one last block
    ((3, 28), 4, (3,), "[28]"),  # the last block named too: listed once
    ((0, 1), 2, (0, 1), None),  # all in range: unchanged
])
def test_fitted_to_keeps_in_range_blocks_and_names_only_the_missing_ones(blocks, layers, fitted, missing):
    config = GuidanceConfig(video=GuidanceParams(stg=1.0), stg_blocks=blocks)
    got, note = config.fitted_to(layers)
    assert got.stg_blocks == fitted
    got.validate(layers)
    if missing is None:
        assert got is config and note is None
        return
    assert note == (f"STG block(s) {missing} do not exist in a model with {layers} layers: "
                    f"using block {layers - 1} instead")


@pytest.mark.parametrize("params, name", [(GuidanceParams(cfg=0.5), "neg"), (GuidanceParams(modality=0.5), "modality"),
                                          (GuidanceParams(stg=-0.5), "perturbed")])
def test_scales_below_the_identity_need_their_pass_and_term(params, name):
    """A scale below the identity (cfg or modality under 1, a negative STG) is guidance too: its pass runs and its
    term enters the combine (the tests elsewhere use 1 and 3 only)."""
    config = GuidanceConfig(video=params, stg_blocks=(0,) if params.stg else ())
    assert name in [s.name for s in pass_specs_for(config)]
    g = torch.Generator().manual_seed(0)
    x0 = {n: torch.randn(1, 4, 3, generator=g) for n in ("cond", name)}
    scale = {"neg": params.cfg - 1, "modality": params.modality - 1, "perturbed": params.stg}[name]
    torch.testing.assert_close(combine(params, x0), x0["cond"] + scale * (x0["cond"] - x0[name]))
