"""pipeline.streams on CPU: the sequential stand-in does nothing, the side-stream cache never travels with a
copy of a model (CUDA streams cannot be copied or pickled), and the model's fork/join/side orchestration keeps
the memory rules for every pass shape (a recording stand-in for the streams), and `fork` keeps handed-over
tensors alive until `join` (stand-in streams). On a GPU: a handed-over tensor outlives a late side-stream read
(memory rule 1). The two-stream path itself is checked bitwise on a GPU in
tests/pipeline/test_model.py::test_audio_side_stream_changes_no_bit."""

from __future__ import annotations

import contextlib
import copy
import pickle
import weakref

import pytest
import torch

from pipeline.config import LatentGrid
from pipeline.streams import SEQUENTIAL, AudioStreams, OverlapStreams, SideStreamCache
from tests.graphs.helpers import make_conditioning, make_latents, tiny_model


def test_sequential_streams_are_no_ops():
    t = torch.ones(2)
    SEQUENTIAL.fork(t)
    SEQUENTIAL.join()
    with SEQUENTIAL.side():
        assert torch.equal(t + 1, torch.full((2,), 2.0))


def test_side_stream_cache_is_not_copied():
    cache = SideStreamCache()
    cache[torch.device("cuda", 0)] = object()  # stands in for a stream, which deepcopy/pickle would refuse
    assert copy.deepcopy(cache) == {} and type(copy.deepcopy(cache)) is SideStreamCache
    assert pickle.loads(pickle.dumps(cache)) == {}


def test_model_deepcopy_keeps_settings_not_streams():
    model = tiny_model()
    model._side_streams[torch.device("cuda", 0)] = object()
    model.overlap_audio = False
    clone = copy.deepcopy(model)
    assert clone.overlap_audio is False and clone._side_streams == {}
    assert len(model._side_streams) == 1


class RecordingStreams(AudioStreams):
    """Logs the orchestration and enforces memory rule 2 (side-stream work only between fork and join)."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.forked = False

    def fork(self, *handed_over: torch.Tensor) -> None:
        self.log.append(f"fork({len(handed_over)})")
        self.forked = True

    def join(self) -> None:
        self.log.append("join")
        self.forked = False

    @contextlib.contextmanager
    def side(self):
        assert self.forked, "side-stream work outside fork/join"
        self.log.append("side")
        yield


def _recorded_model():
    model, recorder = tiny_model(), RecordingStreams()
    model._streams = lambda: recorder
    return model, recorder


def _forward(model, **options):
    grid = LatentGrid.from_tokens(8, audio_tokens=4)
    conditioning = make_conditioning(model.config, grid, device="cpu")
    video, audio = make_latents(model.config, grid, device="cpu")
    text = conditioning.texts["positive"]
    with torch.no_grad():
        model(video, audio, text.video, text.audio, torch.full((1,), 0.5), conditioning.rope, **options)


@pytest.mark.parametrize("options, per_block", [
    ({}, ["side", "join", "fork(4)", "side"]),
    (dict(disable_a2v_cross_attn=True), ["side", "join", "fork(4)", "side"]),
    (dict(disable_v2a_cross_attn=True), ["side", "join", "fork(4)", "side"]),
    (dict(disable_a2v_cross_attn=True, disable_v2a_cross_attn=True), ["side", "side"]),
])
def test_block_orchestration_keeps_the_memory_rules(options, per_block):
    """Per block: audio attention on the side stream, a join before the exchange and a fork (handing over the
    audio hand-over the exchange returns) after it, the audio FFN on the side stream; one fork before the blocks
    (handing over the audio input) and one join after them. Without an exchange the audio chain never leaves the
    side stream. Each fork hands over one `PendingResidual`: its 4 tensors."""
    model, recorder = _recorded_model()
    _forward(model, **options)
    assert recorder.log == ["fork(4)", *per_block * model.config.num_layers, "join"]
    assert not recorder.forked


def test_an_error_inside_the_blocks_still_joins():
    model, recorder = _recorded_model()

    def broken(*args, **kwargs):
        raise RuntimeError("broken region")

    model.blocks[1].video_attention = broken
    with pytest.raises(RuntimeError, match="broken region"):
        _forward(model)
    assert recorder.log[-1] == "join" and not recorder.forked


class _FakeStream:
    """Stands in for a torch.cuda.Stream on CPU: records waits, runs nothing."""

    device = torch.device("cpu")

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def wait_stream(self, other: _FakeStream) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def test_fork_keeps_handed_over_tensors_alive_until_join(monkeypatch):
    """Rule 1's mechanism: the forward may drop a handed-over tensor; `fork` keeps it until `join` (after which
    main waits for the side stream), then lets it go."""
    log: list[str] = []
    main = _FakeStream(log, "main")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    streams = OverlapStreams(_FakeStream(log, "side"))
    x = torch.ones(4)
    alive = weakref.ref(x)
    streams.fork(x)
    del x
    assert alive() is not None
    streams.join()
    assert alive() is None
    assert log == ["side waits for main", "main waits for side"]


@pytest.mark.cuda
def test_a_handed_over_tensor_outlives_a_late_side_read():
    """Rule 1: main drops a tensor right after handing it over and allocates again while the side stream has not
    read it yet (it sleeps first). The new tensor must not get its block: without the kept reference it would,
    and its fill (main does not wait for the side stream) would land before the read."""
    streams = OverlapStreams(torch.cuda.Stream())
    x = torch.full((1 << 20,), 1.0, device="cuda")
    streams.fork(x)
    with streams.side():
        torch.cuda._sleep(100_000_000)  # tens of ms of GPU cycles: the side read comes late
        y = x * 2
    address = x.data_ptr()
    del x
    z = torch.full((1 << 20,), 5.0, device="cuda")
    streams.join()
    torch.cuda.synchronize()
    assert z.data_ptr() != address
    assert torch.equal(y, torch.full_like(y, 2.0))
