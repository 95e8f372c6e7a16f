"""The stage-1 + stage-2 loops on CPU with the tiny model: call counts, determinism, equivalence with a
float64 reference loop written here, host validation, regions, progress, and no host sync (with a
positive control that injects an `.item()` into the sampler)."""

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import res2s
from pipeline.config import LatentGrid, ModelConfig
from pipeline.denoise import denoise_stage1, denoise_stage2
from pipeline.executor import Conditioning, EagerExecutor, TextContext, Velocity, random_conditioning
from pipeline.guidance import GuidanceConfig, GuidanceParams
from pipeline.model import build_model
from pipeline.rope import build_rope_tables
from pipeline.noise import NoiseSeeds, SdeNoise, derive_seed, generator, initial_latents
from pipeline.sigmas import distilled_stage2_sigmas, ltx2_sigmas
from profiling.ranges import recorded_regions
from profiling.syncs import HostSyncError, detect_host_syncs

GRID = LatentGrid(frames=2, height=2, width=3, audio_tokens=5)


class CountingExecutor:
    """Wraps an executor and counts the transformer calls it is asked for."""

    def __init__(self, inner):
        self.inner, self.model, self.calls, self.names = inner, inner.model, 0, []

    def set_conditioning(self, conditioning):
        self.inner.set_conditioning(conditioning)

    def run(self, video, audio, sigma, specs):
        self.calls += len(specs)
        self.names.extend(s.name for s in specs)
        return self.inner.run(video, audio, sigma, specs)


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig.preset("tiny")
    model = build_model(config, device="cpu", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    conditioning = random_conditioning(config, GRID, generator=g, text_tokens=4)
    video, audio = initial_latents((1, GRID.num_video_tokens, 128), (1, GRID.audio_tokens, 128), seed=0, device="cpu")
    return model, conditioning, video, audio


def run_both(model, conditioning, video, audio, *, seed=0, steps=3, **stage2):
    executor = CountingExecutor(EagerExecutor(model))
    s1 = denoise_stage1(executor, conditioning, video, audio, seed=seed, steps=steps, quiet=True)
    s2 = denoise_stage2(executor, conditioning, s1.video, s1.audio, seed=seed, quiet=True, **stage2)
    return s1, s2, executor


def test_hq_call_counts(tiny):
    """HQ stage 1, 15 steps: 29 evaluations x 3 passes = 87 calls; stage 2: 7 evaluations x 1 pass."""
    model, conditioning, video, audio = tiny
    executor = CountingExecutor(EagerExecutor(model))
    s1 = denoise_stage1(executor, conditioning, video, audio, seed=0, quiet=True)
    assert s1.steps == 15 and s1.sigmas == tuple(ltx2_sigmas(15, GRID.num_video_tokens))
    assert [s.name for s in s1.specs] == ["cond", "neg", "modality"]
    assert (s1.evaluations, s1.transformer_calls, executor.calls) == (29, 87, 87)
    assert len(s1.host_step_ms) == 15 and s1.device_step_ms() == s1.host_step_ms  # CPU: host time is run time
    s2 = denoise_stage2(executor, conditioning, s1.video, s1.audio, seed=0, quiet=True)
    assert s2.sigmas == tuple(distilled_stage2_sigmas())
    assert (s2.evaluations, s2.transformer_calls, executor.calls - 87) == (7, 7, 7)
    assert executor.names[87:] == ["cond"] * 7
    for t in (s1.video, s1.audio, s2.video):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert s2.audio is s1.audio  # default: stage 2 refines video only


def test_deterministic_for_a_fixed_seed(tiny):
    model, conditioning, video, audio = tiny
    a1, a2, _ = run_both(model, conditioning, video, audio, seed=7, audio_output="refined")
    b1, b2, _ = run_both(model, conditioning, video, audio, seed=7, audio_output="refined")
    for x, y in ((a1.video, b1.video), (a1.audio, b1.audio), (a2.video, b2.video), (a2.audio, b2.audio)):
        assert torch.equal(x, y)
    c1, c2, _ = run_both(model, conditioning, video, audio, seed=8, audio_output="refined")
    assert not torch.equal(a1.video, c1.video) and not torch.equal(a2.video, c2.video)
    assert not torch.equal(a2.audio, a1.audio)  # "refined" returns stage 2's audio


def test_stg_preset_runs_four_passes(tiny):
    model, conditioning, video, audio = tiny
    executor = CountingExecutor(EagerExecutor(model))
    dev_like = GuidanceConfig(
        video=GuidanceParams(cfg=3.0, stg=1.0, rescale=0.7, modality=3.0),
        audio=GuidanceParams(cfg=7.0, stg=1.0, rescale=0.7, modality=3.0),
        stg_blocks=(1,),  # the tiny model has 2 layers
    )
    result = denoise_stage1(executor, conditioning, video, audio, seed=0, steps=2, guidance=dev_like, quiet=True)
    assert executor.names == ["cond", "neg", "perturbed", "modality"] * 3
    assert result.transformer_calls == 12


# ---------------------------------------------------------------------------------------------------
# Equivalence: the loop with a stub executor vs a float64 reference loop written from the formulas.


class StubExecutor:
    """Velocity = a smooth function of (latents, sigma, pass): no model, exact control of the inputs."""

    scale = {"cond": 0.9, "neg": 1.3, "perturbed": 0.7, "modality": 1.1}

    def set_conditioning(self, conditioning):
        self.conditioning = conditioning

    def run(self, video, audio, sigma, specs):
        return {
            s.name: Velocity(torch.tanh(self.scale[s.name] * video) - sigma * video.flip(-1),
                             torch.sin(self.scale[s.name] * audio) + sigma * audio)
            for s in specs
        }


def reference_guided(x, sigma, params, velocity_fn):
    """Guided x0 in float64 (x0 = x - sigma v per pass; then the section-3 formula, whole-tensor std)."""
    x0 = {n: x - sigma * velocity_fn(n, x, sigma) for n in ("cond", "neg", "perturbed", "modality")}
    cond = x0["cond"]
    pred = (cond + (params.cfg - 1) * (cond - x0["neg"]) + params.stg * (cond - x0["perturbed"])
            + (params.modality - 1) * (cond - x0["modality"]))
    if params.rescale:
        pred = pred * (params.rescale * cond.std() / pred.std() + 1 - params.rescale)
    return pred


def reference_loop(latents, sigmas, guidance, seed, stage, eta=0.5, bongmath=True):
    """The res2s HQ loop as in LTX2_REFERENCE section 5, float64 throughout, 100-iteration bongmath."""
    stub = StubExecutor.scale
    fns = (lambda n, x, s: torch.tanh(stub[n] * x) - s * x.flip(-1), lambda n, x, s: torch.sin(stub[n] * x) + s * x)
    params = (guidance.video, guidance.audio)
    gens = {k: generator(getattr(NoiseSeeds.for_stage(seed, stage), k), "cpu") for k in ("substep", "step")}

    def noise(kind, x):
        n = torch.randn(x.shape, generator=gens[kind], dtype=torch.float64)
        n = (n - n.mean()) / n.std()
        return (n - n.mean(dim=(-2, -1), keepdim=True)) / n.std(dim=(-2, -1), keepdim=True)

    def sde(x, x_det, sigma, sigma_next, n):
        up = min(eta * sigma_next, 0.9999 * sigma_next)
        res = math.sqrt(sigma_next**2 - up**2)
        alpha = 1 - sigma_next + res
        eps = (x - x_det) / (sigma - sigma_next)
        return alpha * (x - sigma * eps + res / alpha * eps) + up * n

    xs = [t.double() for t in latents]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d1 = [reference_guided(x, sigma, p, f) for x, p, f in zip(xs, params, fns)]
        if sigma_next == 0:
            xs = d1
            continue
        h = math.log(sigma / sigma_next)
        a21 = 0.5 * (math.exp(-h / 2) - 1) / (-h / 2)
        b2 = 2 * (math.exp(-h) - 1 + h) / h**2
        b1 = (math.exp(-h) - 1) / (-h) - b2
        mid = math.sqrt(sigma * sigma_next)
        eps1 = [d - x for d, x in zip(d1, xs)]
        sub = [noise("substep", x) for x in xs]
        x_mid = [sde(x, x + h * a21 * e, sigma, mid, n) for x, e, n in zip(xs, eps1, sub)]
        if bongmath and h < 0.5 and sigma > 0.03:
            for _ in range(100):
                xs = [m - h * a21 * e for m, e in zip(x_mid, eps1)]
                eps1 = [d - x for d, x in zip(d1, xs)]
        d2 = [reference_guided(m, mid, p, f) for m, p, f in zip(x_mid, params, fns)]
        step = [noise("step", x) for x in xs]
        xs = [sde(x, x + h * (b1 * e + b2 * (d - x)), sigma, sigma_next, n)
              for x, e, d, n in zip(xs, eps1, d2, step)]
    return xs


@pytest.mark.parametrize("guidance", ["hq", GuidanceConfig(video=GuidanceParams(cfg=2.0, stg=0.5, rescale=0.3),
                                                           audio=GuidanceParams(modality=2.5), stg_blocks=(0,))])
def test_stage1_matches_float64_reference_loop(tiny, guidance):
    _, conditioning, video, audio = tiny
    video, audio = video.double(), audio.double()  # float64 state: compare without float32 rounding
    sigmas = ltx2_sigmas(4, GRID.num_video_tokens)
    result = denoise_stage1(StubExecutor(), conditioning, video, audio, seed=3, sigmas=sigmas,
                            guidance=guidance, quiet=True)
    config = GuidanceConfig.preset(guidance) if isinstance(guidance, str) else guidance
    want = reference_loop((video, audio), sigmas, config, seed=3, stage=1)
    # The loop combines guidance in float32 (as specified); everything else is float64.
    torch.testing.assert_close(result.video, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.audio, want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta, bongmath", [(0.2, True), (0.5, False), (0.0, True)])
def test_stage1_eta_and_bongmath_reach_every_step(tiny, eta, bongmath):
    _, conditioning, video, audio = tiny
    video, audio = video.double(), audio.double()
    sigmas = ltx2_sigmas(4, GRID.num_video_tokens)
    result = denoise_stage1(StubExecutor(), conditioning, video, audio, seed=3, sigmas=sigmas, eta=eta,
                            bongmath=bongmath, quiet=True)
    want = reference_loop((video, audio), sigmas, GuidanceConfig.preset("hq"), seed=3, stage=1, eta=eta,
                          bongmath=bongmath)
    torch.testing.assert_close(result.video, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.audio, want[1], rtol=1e-5, atol=1e-5)
    default = reference_loop((video, audio), sigmas, GuidanceConfig.preset("hq"), seed=3, stage=1)
    assert not torch.allclose(result.video, default[0], rtol=1e-4, atol=1e-4)  # the settings changed the result
    if eta == 0.0:  # no noise injected: the seed cannot matter
        other = denoise_stage1(StubExecutor(), conditioning, video, audio, seed=99, sigmas=sigmas, eta=0.0,
                               quiet=True)
        torch.testing.assert_close(other.video, result.video, rtol=0, atol=0)


@pytest.mark.parametrize("bongmath", [True, False])
def test_stage2_matches_reference_loop(tiny, bongmath):
    _, conditioning, video, audio = tiny
    clean = (video.double() * 0.5, audio.double() * 0.5)
    result = denoise_stage2(StubExecutor(), conditioning, *clean, seed=4, audio_output="refined", quiet=True,
                            bongmath=bongmath)
    sigmas = distilled_stage2_sigmas()
    g = generator(derive_seed(4, 2, "renoise"), "cpu")
    noisy = [x * (1 - sigmas[0]) + torch.randn(x.shape, generator=g, dtype=x.dtype) * sigmas[0] for x in clean]
    want = reference_loop(noisy, sigmas, GuidanceConfig(), seed=4, stage=2, bongmath=bongmath)
    torch.testing.assert_close(result.video, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.audio, want[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# No host sync.


class NoHostSyncMode(TorchDispatchMode):
    """Self-contained detector: fails on `aten._local_scalar_dense` (.item(), bool(t), float(t)),
    data-dependent-shape ops and device -> cpu copies."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.SYNC_OPS:
            raise AssertionError(f"host sync: {func}")
        if name in ("_to_copy", "copy_", "to"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst).type == "cpu":
                raise AssertionError(f"device -> cpu copy: {func}")
        return func(*args, **kwargs)


def test_loops_never_sync_the_host(tiny):
    model, conditioning, video, audio = tiny
    # 2 stage-1 steps (a full step and the terminal one) + the default stage 2 (bongmath on its first step):
    # every sampler branch, at the detectors' per-op cost.
    with detect_host_syncs(mode="raise") as report:
        run_both(model, conditioning, video, audio, steps=2)
    assert report.findings == []
    with NoHostSyncMode():
        run_both(model, conditioning, video, audio, steps=2)


def test_detectors_catch_an_item_in_the_sampler(tiny, monkeypatch):
    model, conditioning, video, audio = tiny
    original = res2s.sde_step

    def sde_step_with_item(x, x_det, noise, **kwargs):
        if x.abs().max().item() > 1e6:  # a host read the sampler must never do
            raise AssertionError("unreachable")
        return original(x, x_det, noise, **kwargs)

    monkeypatch.setattr(res2s, "sde_step", sde_step_with_item)
    with pytest.raises(HostSyncError, match="_local_scalar_dense") as info:
        with detect_host_syncs(mode="raise"):
            run_both(model, conditioning, video, audio, steps=2)
    assert "step 0" in info.value.findings[0].ranges
    with pytest.raises(AssertionError, match="host sync: aten._local_scalar_dense"):
        with NoHostSyncMode():
            run_both(model, conditioning, video, audio, steps=2)


# ---------------------------------------------------------------------------------------------------
# Regions, progress output and host validation.


def test_regions(tiny):
    model, conditioning, video, audio = tiny

    with recorded_regions() as pushed:
        run_both(model, conditioning, video, audio, steps=2)
    assert pushed[:6] == ["stage1", "loop", "step 0", "eval 0.0", "pass cond", "pass neg"]
    assert pushed.count("stage1") == pushed.count("stage2") == 1 and pushed.count("loop") == 2
    assert "eval 1.0" in pushed and pushed.count("eval 1.1") == 1  # stage 2's step 1; stage 1's is terminal
    assert pushed.count("pass cond") == 3 + 7


def test_progress_and_quiet(tiny, capsys):
    model, conditioning, video, audio = tiny
    executor = EagerExecutor(model)
    denoise_stage1(executor, conditioning, video, audio, seed=0, steps=2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[stage1] step 1/2") and "2 eval x 3 pass" in lines[0]
    assert "1 eval x 3 pass" in lines[1]
    denoise_stage1(executor, conditioning, video, audio, seed=0, steps=2, quiet=True)
    assert capsys.readouterr() == ("", "")


def _bad_inputs(tiny):
    model, conditioning, video, audio = tiny
    executor = EagerExecutor(model)
    pos_only = Conditioning({"positive": conditioning.texts["positive"]}, conditioning.rope)
    no_rope = Conditioning(conditioning.texts, None)
    positive = conditioning.texts["positive"]
    narrow = Conditioning({**conditioning.texts, "positive": TextContext(positive.video[..., :7], positive.audio)},
                          conditioning.rope)
    dev = GuidanceConfig.preset("dev")  # STG block 28 of a 2-layer model
    rope = conditioning.rope
    on_meta = {f.name: tuple(t.to("meta") for t in getattr(rope, f.name)) for f in dataclasses.fields(rope)}
    meta_rope = Conditioning(conditioning.texts, dataclasses.replace(rope, **on_meta))
    return [
        (dict(conditioning=meta_rope), "conditioning.rope is on meta, expected the model's device cpu"),
        (dict(conditioning=Conditioning(conditioning.texts, build_rope_tables(model.config, GRID, device="cpu",
                                                                               batch_size=2))),
         "conditioning.rope was built for batch size 2, but the latents have batch 1"),  # was refused in step 0
        (dict(conditioning=no_rope), "conditioning.rope must be RopeTables"),
        (dict(conditioning=narrow), r"conditioning.texts\['positive'\].video is 7 wide, the model expects"),
        (dict(video=video[0]), "video must be a floating \\[B, N, C\\] tensor"),
        (dict(video=video.long()), r"video must be a floating \[B, N, C\] tensor .*got torch.int64"),
        (dict(audio=audio.expand(2, -1, -1)), "audio batch 2"),
        (dict(video=video[:, :5]), "5 tokens but the RoPE tables were built for 12"),
        (dict(audio=audio[..., :64]), "64 channels"),
        # latents elsewhere than the model: the latents are named, not the conditioning that sits with the model
        (dict(video=torch.zeros(1, 12, 128, device="meta")), "video is on meta, expected the model's device cpu"),
        (dict(video=video.to("meta"), audio=audio.to("meta")), "video is on meta, expected the model's device"),
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(steps=3, sigmas=[1.0, 0.5, 0.0]), "disagrees"),
        (dict(sigmas=[1.0, 1.0, 0.0]), "strictly decreasing"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(eta=2.0), "eta"),
        (dict(bongmath=1), "bongmath"),
        (dict(guidance=dev), "out of range for a model with 2 layers"),
        (dict(guidance="fast"), "unknown guidance preset"),
        (dict(conditioning=pos_only), "'negative' text"),
        (dict(executor=object()), "PassExecutor"),
        (dict(num_tokens=0), "num_tokens"),
        (dict(sigmas=[1.0, 0.5, 0.0], num_tokens=4096), "num_tokens=4096 has no effect when sigmas are given"),
        (dict(sigmas=[1.0, 0.5, 0.0], steps=2, num_tokens=12), "pass sigmas or num_tokens, not both"),
    ], executor


def test_stage1_validates_inputs_before_the_first_step(tiny):
    cases, executor = _bad_inputs(tiny)
    model, conditioning, video, audio = tiny
    for change, match in cases:
        counter = CountingExecutor(executor)
        kwargs = dict(executor=counter, conditioning=conditioning, video=video, audio=audio, seed=0, quiet=True)
        kwargs.update(change)
        with pytest.raises(ValueError, match=match):
            denoise_stage1(**kwargs)
        assert counter.calls == 0, change


def test_stage2_validates_inputs(tiny):
    model, conditioning, video, audio = tiny
    executor = EagerExecutor(model)
    with pytest.raises(ValueError, match="audio_output"):
        denoise_stage2(executor, conditioning, video, audio, seed=0, audio_output="drop")
    with pytest.raises(ValueError, match="strictly decreasing"):
        denoise_stage2(executor, conditioning, video, audio, seed=0, sigmas=[0.5, 0.6, 0.0])
    with pytest.raises(ValueError, match="seed"):
        denoise_stage2(executor, conditioning, video, audio, seed=None)


def test_step_timer_records_on_the_latents_device_stream(monkeypatch):
    """The events go to the stream of the device the steps run on, not the current device's (cuda:1 here)."""
    from pipeline import denoise

    recorded, events = [], []

    class FakeEvent:
        def __init__(self, enable_timing):
            events.append(self)

        def record(self, stream=None):
            recorded.append((events.index(self), stream))

    monkeypatch.setattr(denoise.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(denoise.torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    timer = denoise.StepTimer(torch.device("cuda:1"), num_steps=2)
    for index in range(2):
        with timer.step(index):
            pass
    # Each step's start event before it, its end event after it: (start, end) pairs in order, never one event twice.
    assert recorded == [(i, "stream of cuda:1") for i in range(4)]


@pytest.mark.cuda
def test_gpu_loops_never_sync_and_time_steps_with_events():
    """On a GPU: PyTorch's sync debug mode in "error" plus the dispatch detector around both stages; the
    per-step CUDA event timings are read once afterwards; SDE noise is bitwise reproducible on the device."""
    from profiling.syncs import cuda_sync_debug

    device = torch.device("cuda")
    config = ModelConfig.preset("tiny")
    model = build_model(config, device=device, dtype=torch.bfloat16, seed=0)
    g = torch.Generator().manual_seed(0)
    conditioning = random_conditioning(config, GRID, generator=g, text_tokens=4, device=device, dtype=torch.bfloat16)
    video, audio = initial_latents((1, GRID.num_video_tokens, 128), (1, GRID.audio_tokens, 128), seed=0, device=device)
    executor = EagerExecutor(model)
    torch.cuda.synchronize()
    with cuda_sync_debug("error"), detect_host_syncs(mode="raise"):
        s1 = denoise_stage1(executor, conditioning, video, audio, seed=0, steps=3, quiet=True)
        s2 = denoise_stage2(executor, conditioning, s1.video, s1.audio, seed=0, quiet=True)
    for result, steps in ((s1, 3), (s2, 4)):
        ms = result.device_step_ms()
        assert len(ms) == steps and all(m > 0 for m in ms)
    assert torch.isfinite(s2.video).all()
    a, b = (SdeNoise(NoiseSeeds.for_stage(1, 1), device)("step", (video, audio)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_step_timer_reads_each_steps_events_after_one_wait(monkeypatch):
    """The CUDA-event path on CPU with stand-in events: per-step end - start, one host wait on the last end."""
    from pipeline import denoise

    clock, waited = [0.0], []

    class FakeEvent:
        def __init__(self, enable_timing):
            self.t = None

        def record(self, stream=None):
            clock[0] += 1.0
            self.t = clock[0]

        def synchronize(self):
            waited.append(self)

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(denoise.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(denoise.torch.cuda, "current_stream", lambda device=None: "stream")
    timer = denoise.StepTimer(torch.device("cuda:0"), num_steps=3)
    for index in range(2):  # 2 of 3 steps ran
        with timer.step(index):
            clock[0] += 10.0
    assert timer.device_ms() == (11.0, 11.0)
    assert waited == [timer._events[1][1]]
