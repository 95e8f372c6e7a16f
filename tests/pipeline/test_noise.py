"""Noise: seeded, reproducible bit for bit, separate streams, standardised as the reference does."""

import pytest
import torch

from pipeline.noise import (
    NoiseSeeds,
    SdeNoise,
    derive_seed,
    generator,
    initial_latents,
    renoise,
    standard_noise,
    validate_seed,
)

LIKE = (torch.zeros(2, 12, 8), torch.zeros(2, 5, 8))


def reference_new_noise(shape, gen):
    """The reference's `_get_new_noise`: float64 randn, global standardisation, then per item over (-2, -1)."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = (noise - noise.mean()) / noise.std()
    return noise.sub_(noise.mean(dim=(-2, -1), keepdim=True)).div_(noise.std(dim=(-2, -1), keepdim=True))


def test_standard_noise_matches_reference_bitwise():
    got = standard_noise(LIKE[0], generator(123, "cpu"))
    want = reference_new_noise(LIKE[0].shape, generator(123, "cpu"))
    assert got.dtype == torch.float64
    assert torch.equal(got, want)


def test_standardised_per_item():
    n = standard_noise(torch.zeros(3, 40, 16), generator(7, "cpu"))
    torch.testing.assert_close(n.mean(dim=(1, 2)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(n.std(dim=(1, 2)), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-14)


def test_same_seed_bitwise_identical():
    a, b = SdeNoise(NoiseSeeds.for_stage(5, 1), "cpu"), SdeNoise(NoiseSeeds.for_stage(5, 1), "cpu")
    for kind in ("substep", "step", "substep", "step"):
        for x, y in zip(a(kind, LIKE), b(kind, LIKE), strict=True):
            assert torch.equal(x, y)
    v1, a1 = initial_latents((1, 12, 8), (1, 5, 8), seed=9, device="cpu")
    v2, a2 = initial_latents((1, 12, 8), (1, 5, 8), seed=9, device="cpu")
    assert torch.equal(v1, v2) and torch.equal(a1, a2) and v1.dtype == torch.float32


def test_stage_2_start_latents_are_no_seeds_stage_1_noise():
    """Stage 2 alone drew its start from seed + 1's stage-1 stream: `--stages 2 --seed 0` began where seed 1's
    stage 1 did (and the largest seed overflowed)."""
    shapes = (1, 12, 8), (1, 5, 8)
    stage2 = initial_latents(*shapes, seed=0, device="cpu", stage=2)[0]
    for seed in (0, 1):
        assert not torch.equal(stage2, initial_latents(*shapes, seed=seed, device="cpu")[0])
    initial_latents(*shapes, seed=2**63 - 1, device="cpu", stage=2)


def test_streams_are_separate():
    """Draws of one kind never advance the other kind's generator; the two kinds differ."""

    def fresh():
        return SdeNoise(NoiseSeeds.for_stage(5, 1), "cpu")

    mixed = fresh()
    step_first = mixed("step", LIKE)
    assert all(torch.equal(x, y) for x, y in zip(mixed("substep", LIKE), fresh()("substep", LIKE)))
    mixed = fresh()
    mixed("substep", LIKE)
    assert all(torch.equal(x, y) for x, y in zip(mixed("step", LIKE), step_first))
    assert not torch.equal(step_first[0], fresh()("substep", LIKE)[0])


def test_seeds_differ_per_stage_stream_and_seed():
    seeds = {derive_seed(s, st, k) for s in (0, 1, 2) for st in (1, 2) for k in ("init", "step", "substep", "renoise")}
    assert len(seeds) == 24
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, 1, "step") == derive_seed(0, 1, "step")  # pure function
    assert NoiseSeeds.for_stage(3, 1) != NoiseSeeds.for_stage(3, 2)


def test_renoise():
    x = (torch.ones(1, 4, 2), torch.full((1, 3, 2), 2.0))
    out = renoise(x, 0.25, generator(1, "cpu"))
    g = generator(1, "cpu")
    n0 = torch.randn(1, 4, 2, generator=g)
    n1 = torch.randn(1, 3, 2, generator=g)
    torch.testing.assert_close(out[0], 0.75 * x[0] + 0.25 * n0)
    torch.testing.assert_close(out[1], 0.75 * x[1] + 0.25 * n1)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.0, True, "1", None])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        validate_seed(seed)


def test_bad_kind_and_stream():
    with pytest.raises(ValueError, match="kind"):
        SdeNoise(NoiseSeeds(1, 2), "cpu")("init", LIKE)
    with pytest.raises(ValueError, match="stream"):
        derive_seed(1, 1, "other")
