"""The per-shape SDPA backend choice of `ltx2-graphs bench --attention measure` (the timing itself needs a GPU)."""

import pytest
import torch

from graphs.bench_attention import BackendChoice, measure_self_attention
from pipeline.config import ModelConfig
from profiling.timing import TimingStats

from tests.graphs.test_cli import run_cli


def fake_timer(ms_by_call):
    calls = iter(ms_by_call)

    def timer(fn):
        return TimingStats.from_samples([next(calls)])

    return timer


def test_fastest_backend_wins_and_is_described():
    choice = measure_self_attention(ModelConfig.preset("tiny"), 64, device=torch.device("cpu"), dtype=torch.float32,
                                    timer=fake_timer([1.74, 3.20, 6.32]))
    assert choice.median_ms == {"cudnn": 1.74, "flash": 3.20, "efficient": 6.32}
    assert choice.best == "cudnn"
    assert choice.describe() == "64 tokens: cudnn 1.740 ms, flash 3.200 ms, efficient 6.320 ms -> cudnn"


def test_backends_that_cannot_run_are_reported_not_chosen():
    def no_kernel(fn):  # what SDPA says when a backend cannot take the shape, dtype or card
        raise RuntimeError("No available kernel. Aborting execution.\nmore detail")

    choice = measure_self_attention(ModelConfig.preset("tiny"), 64, device=torch.device("cpu"), dtype=torch.float32,
                                    timer=no_kernel)
    assert choice.median_ms == {} and choice.errors["flash"] == "No available kernel. Aborting execution."
    assert choice.best == "auto" and "cannot run" in choice.describe()
    assert BackendChoice(8160, {"flash": 3.2, "cudnn": 1.7}, {}).best == "cudnn"


def test_the_default_timer_times_the_device_the_calls_run_on(monkeypatch):
    """It timed on the current device: with --device cuda:1 the events and the sync were cuda:0's."""
    import graphs.bench_attention as bench_attention

    seen = []
    monkeypatch.setattr(bench_attention, "time_cuda",
                        lambda fn, **kw: seen.append(kw.get("device")) or TimingStats.from_samples([1.0]))
    measure_self_attention(ModelConfig.preset("tiny"), 8, device=torch.device("cpu"), dtype=torch.float32)
    assert seen == [torch.device("cpu")] * 3


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="not SDPA backends"):
        measure_self_attention(ModelConfig.preset("tiny"), 8, device=torch.device("cpu"), dtype=torch.float32,
                               backends=("turbo",))


@pytest.mark.parametrize("choice", ["measure", "cudnn", "flash", "efficient"])
def test_gpu_only_choices_are_refused_before_any_row_on_cpu(capsys, choice):
    code, _, err = run_cli(capsys, "bench", "--preset", "tiny", "--device", "cpu", "--tokens", "48",
                           "--attention", choice, "--no-peer", "--repeats", "1", "--warmup", "1")
    lines = [line for line in err.splitlines() if not line.startswith("[")]
    assert code == 3 and len(lines) == 1 and f"--attention {choice}" in lines[0] and "needs a GPU" in lines[0]
    assert not any("building" in line for line in err.splitlines())  # refused before the model was built
