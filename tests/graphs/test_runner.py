"""The runner: guidance flags, stage 2, atomic output, real-weight loading and its one-line errors (CPU), plus a
short end-to-end run with per-pass graphs on a GPU."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from graphs.run_output import write_safetensors_atomic
from graphs.cli import build_parser, main
from graphs.cli_console import CommandError
from graphs.runner import guidance_from_args, options_from_args, stage2_grid, upsample_2x
from pipeline.config import LatentGrid, ModelConfig


def parse(*argv: str):
    return build_parser().parse_args(["run", *argv])


def run_json(capsys, *argv: str) -> dict:
    code = main(["run", "--quiet", "--json", *argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_guidance_overrides_change_the_passes():
    g = guidance_from_args(parse("--video-cfg", "1", "--audio-cfg", "1"))
    assert g.video.cfg == 1.0 and g.audio.cfg == 1.0 and g.video.rescale == 0.45  # the rest from the preset
    from pipeline.passes import pass_specs_for

    assert [s.name for s in pass_specs_for(g)] == ["cond", "modality"]
    dev = guidance_from_args(parse("--guidance", "dev", "--stg-blocks", "1"))
    assert dev.stg_blocks == (1,) and [s.name for s in pass_specs_for(dev)] == ["cond", "neg", "perturbed", "modality"]


def test_dev_preset_on_a_shallow_model_uses_its_last_block(capsys):
    options = options_from_args(parse("--guidance", "dev"))
    assert options.guidance.stg_blocks == (1,) and "using block 1" in options.notes[0]
    data = run_json(capsys, "--guidance", "dev", "--steps", "1")
    assert data["stages"][0]["passes"] == ["cond", "neg", "perturbed", "modality"] and data["syncs"] == 0


def test_a_host_sync_in_the_loop_fails_the_run_after_its_report(capsys, monkeypatch, tmp_path):
    """`--sync-check on` (the default) is a check: a sync in the loop exits 4, after the report and the latents
    are written. Here the guidance combine reads a value, as a careless edit might."""
    import pipeline.denoise

    combine = pipeline.denoise.combine

    def reading_combine(*args, **kwargs):
        out = combine(*args, **kwargs)
        float(out[0].sum())  # a host read: on a GPU, a sync
        return out

    monkeypatch.setattr(pipeline.denoise, "combine", reading_combine)
    code = main(["run", "--quiet", "--steps", "1", "--json", "--output", str(tmp_path / "out.safetensors")])
    out = capsys.readouterr()
    syncs = json.loads(out.out)["syncs"]  # one per combine call (video and audio)
    assert code == 4 and syncs >= 1 and (tmp_path / "out.safetensors").exists()
    assert f"the sync check counted {syncs} host sync(s) in the denoising loop" in out.err
    assert "hint: a pass run under `profiling.syncs.detect_host_syncs(mode='raise')`" in out.err  # profile needs a GPU


def test_stg_without_blocks_is_a_command_error():
    with pytest.raises(CommandError, match="stg_blocks is empty"):
        guidance_from_args(parse("--audio-stg", "0.5"))


def test_resolution_and_tokens_flags_set_the_grid():
    w = options_from_args(parse("--resolution", "256x128", "--frames", "9", "--fps", "25")).workload
    assert (w.grid.frames, w.grid.height, w.grid.width, w.grid.audio_tokens) == (2, 4, 8, 9)
    w = options_from_args(parse("--tokens", "24", "--audio-tokens", "5", "--text-tokens", "3")).workload
    assert w.grid.num_video_tokens == 24 and w.grid.audio_tokens == 5 and w.text_tokens == 3


def test_the_runs_conditioning_is_on_the_workload_device():
    """`paths_off_device` (what the graph executor checks conditioning with) names the tensors NOT on a device."""
    from graphs import trees
    from graphs.run_workload import random_conditioning

    workload = options_from_args(parse("--device", "cpu")).workload
    conditioning = random_conditioning(workload)
    assert trees.paths_off_device(conditioning, workload.device) == []
    tensors = [path for path, v in trees.leaves(conditioning) if isinstance(v, torch.Tensor)]
    assert tensors and trees.paths_off_device(conditioning, torch.device("meta")) == tensors


def test_upsample_2x_repeats_each_latent_into_a_2x2_block():
    grid = LatentGrid(frames=2, height=2, width=3, audio_tokens=4)
    video = torch.arange(2 * 2 * 3, dtype=torch.float32).view(1, -1, 1).expand(1, -1, 2)  # [1, 12, 2]
    up = upsample_2x(video.contiguous(), grid)  # [1, 48, 2]
    big = stage2_grid(grid)
    assert up.shape == (1, big.num_video_tokens, 2)
    x = up.view(2, 4, 6, 2)[..., 0]
    assert torch.equal(x[:, ::2, ::2], video[0, :, 0].view(2, 2, 3))
    assert torch.equal(x[:, 1::2, 1::2], x[:, ::2, ::2])


def test_two_stages(capsys):
    data = run_json(capsys, "--stages", "1,2", "--steps", "2", "--tokens", "12", "--audio-tokens", "5")
    s1, s2 = data["stages"]
    assert s1["stage"] == "stage1" and s1["video_tokens"] == 12 and s1["transformer_calls"] == 9
    # stage 2: twice the width and height, distilled schedule with the res2s floor (3 full steps + terminal),
    # one "cond" pass per evaluation.
    assert s2["stage"] == "stage2" and s2["video_tokens"] == 48 and s2["passes"] == ["cond"]
    assert s2["evaluations"] == 7 and s2["transformer_calls"] == 7
    assert data["syncs"] == 0


def test_stage2_alone_starts_from_random_latents(capsys):
    data = run_json(capsys, "--stages", "2", "--tokens", "12", "--audio-tokens", "5")
    assert [s["stage"] for s in data["stages"]] == ["stage2"] and data["stages"][0]["video_tokens"] == 48
    data = run_json(capsys, "--stages", "2", "--tokens", "12", "--audio-tokens", "5", "--seed", str(2**63 - 1))
    assert data["seed"] == 2**63 - 1  # the largest seed the parser takes (stage 2 drew from seed + 1 before)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.safetensors"
    write_safetensors_atomic(target, {"x": torch.ones(2)}, {"k": "v"})
    assert torch.equal(load_file(target)["x"], torch.ones(2))
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # not the temp file's private mode

    import safetensors.torch

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors_atomic(target, {"x": torch.zeros(2)})
    assert torch.equal(load_file(target)["x"], torch.ones(2))  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temp file left


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A tiny model saved in both formats, plus a checkpoint of a different depth."""
    from pipeline.model import build_model
    from pipeline.weights import save_diffusers_transformer, save_official_checkpoint

    root = tmp_path_factory.mktemp("weights")
    config = ModelConfig.preset("tiny")
    model = build_model(config, device="cpu", dtype=torch.float32, seed=5)
    deeper = build_model(config.replace(num_layers=3), device="cpu", dtype=torch.float32, seed=5)
    return {
        "diffusers": save_diffusers_transformer(model, root / "diffusers"),
        "official": save_official_checkpoint(model, root / "ltx.safetensors"),
        "mismatch": save_official_checkpoint(deeper, root / "deeper.safetensors"),
    }


@pytest.mark.parametrize("fmt", ["diffusers", "official"])
def test_run_with_real_weights(capsys, tiny_checkpoints, fmt):
    base = run_json(capsys, "--steps", "1", "--seed", "5")
    loaded = run_json(capsys, "--steps", "1", "--seed", "5", "--weights", str(tiny_checkpoints[fmt]))
    assert loaded["stages"][0]["transformer_calls"] == base["stages"][0]["transformer_calls"]


def test_mismatched_checkpoint_is_one_line(capsys, tiny_checkpoints):
    code = main(["run", "--steps", "1", "--weights", str(tiny_checkpoints["mismatch"])])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(err) == 1
    assert "does not match" in err[0] and "hint:" in err[0] and len(err[0]) < 600


def test_missing_checkpoint_is_one_line(capsys, tmp_path):
    code = main(["run", "--weights", str(tmp_path / "none.safetensors")])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(err) == 1 and "no such file" in err[0]


@pytest.mark.cuda
def test_graphs_executor_end_to_end_on_gpu(capsys, tmp_path):
    """Small preset, per-pass graphs, 2 HQ steps: every pass captured once, replayed without a host sync."""
    data = run_json(capsys, "--preset", "small", "--executor", "graphs", "--tokens", "256", "--steps", "2",
                    "--output", str(tmp_path / "out.safetensors"))
    stage = data["stages"][0]
    assert stage["warmup"]["captures"] == 3 and stage["transformer_calls"] == 9
    assert stage["syncs"]["count"] == 0, stage["syncs"]["findings"]
    assert data["syncs"] == 0 and stage["gpu_busy"] is not None
    assert torch.isfinite(load_file(tmp_path / "out.safetensors")["video"]).all()


@pytest.mark.cuda
def test_graphs_match_eager_on_gpu(capsys, tmp_path):
    """Same seed, eager vs graphs, fp32: the final latents are bitwise equal (replays launch the kernels eager
    launches, on the same inputs)."""
    args = ("--preset", "small", "--tokens", "256", "--steps", "2", "--dtype", "fp32")
    outs = {}
    for executor in ("eager", "graphs"):
        run_json(capsys, *args, "--executor", executor, "--output", str(tmp_path / f"{executor}.safetensors"))
        outs[executor] = load_file(tmp_path / f"{executor}.safetensors")
    for name in ("video", "audio"):
        assert torch.equal(outs["graphs"][name], outs["eager"][name]), name


def test_a_file_that_is_not_a_checkpoint_is_one_line(capsys, tmp_path):
    path = tmp_path / "latents.safetensors"
    write_safetensors_atomic(path, {"video": torch.zeros(1, 2, 3)})
    code = main(["run", "--weights", str(path)])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(err) == 1 and "holds no LTX-2.3 transformer tensors" in err[0]
