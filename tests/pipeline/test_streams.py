"""pipeline.streams on CPU: the sequential stand-in does nothing, and the side-stream cache never travels with a
copy of a model (CUDA streams cannot be copied or pickled). The two-stream path is checked bitwise on a GPU in
tests/pipeline/test_model.py::test_audio_side_stream_changes_no_bit."""

from __future__ import annotations

import copy
import pickle

import torch

from pipeline.streams import SEQUENTIAL, SideStreamCache
from tests.graphs.helpers import tiny_model


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
