"""Static inputs: the device buffers every pass graph of one input signature reads.

A CUDA graph reads its inputs from the addresses it saw at capture, so the inputs of all passes live in
buffers that never move: the video and audio latents (copied in once per evaluation, shared by every pass),
the sigma buffer (filled from a host float), and one static copy of each text context and of the RoPE
tables (copied in once per generation, after `set_conditioning`). The executor owns these copies; it never
writes into the caller's tensors.

Latents and text contexts are stored in the model dtype: copying into them casts exactly as the eager
executor's `.to(model.dtype)` does, so graphed and eager passes see bitwise the same inputs.

Sync contract: `load` and `set_conditioning` issue device copies and a fill on the current stream and never
synchronise the host. The sigma buffer is written with `fill_(float)` and never read back.
Every write checks shape and device first (and that a cast is between floating dtypes): `copy_` would
otherwise broadcast silently, which is exactly the wrong replay the graph layer exists to prevent.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from graphs import trees
from graphs.keys import TensorSig
from pipeline.executor import check_host_float
from pipeline.rope import RopeTables


def check_like(name: str, value: object, expected: Tensor, *, cast: bool = False) -> None:
    """ValueError naming `name` unless `value` has the shape and device of `expected`, and its dtype (or, with
    `cast`, any floating dtype when `expected` is floating)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    dtype_ok = value.dtype == expected.dtype or (
        cast and value.dtype.is_floating_point and expected.dtype.is_floating_point
    )
    if value.shape != expected.shape or value.device != expected.device or not dtype_ok:
        raise ValueError(
            f"{name} is {TensorSig.of(value)} on {value.device}, but the captured graph reads "
            f"{TensorSig.of(expected)} on {expected.device}; inputs of another shape or device need their own "
            "graph (a new key), never a replay of this one"
        )


class ModelArgs(NamedTuple):
    """A pass's positional forward arguments, in `LTX2Transformer.forward`'s order (static buffers)."""

    video: Tensor
    audio: Tensor
    video_context: Tensor
    audio_context: Tensor
    sigma: Tensor
    rope: RopeTables


class StaticInputs:
    """The buffers shared by all pass graphs of one input signature (`graphs.keys.InputSignature`).

    Attributes (all on one device, allocated once, written in place only):
      video  [B, Nv, C]   latents in the model dtype, copied in once per evaluation
      audio  [B, Na, C]
      sigma  [B] float32  filled from the host float of the evaluation
      texts  name -> static copy of the conditioning's `TextContext` in the model dtype
             (video [b, Nt, Dv], audio [b, Nt, Da], b = 1 or B as given)
      rope   static copy of the conditioning's `RopeTables` (own dtype)
    """

    def __init__(self, video: Tensor, audio: Tensor, conditioning, dtype: torch.dtype, generation: int) -> None:
        device = video.device
        self.video = torch.zeros(video.shape, dtype=dtype, device=device)
        self.audio = torch.zeros(audio.shape, dtype=dtype, device=device)
        self.sigma = torch.zeros(video.shape[0], dtype=torch.float32, device=device)
        self.texts = {
            name: trees.map_tensors(text, lambda t: torch.zeros(t.shape, dtype=dtype, device=t.device))
            for name, text in conditioning.texts.items()
        }
        self.rope = trees.map_tensors(conditioning.rope, lambda t: torch.zeros(t.shape, dtype=t.dtype, device=t.device))
        self.conditioning_generation = -1  # which set_conditioning the text/rope copies hold
        self.set_conditioning(conditioning, generation)

    def set_conditioning(self, conditioning, generation: int) -> None:
        """Copy the texts (casting to the model dtype) and RoPE tables into the static copies; no host sync."""
        if sorted(conditioning.texts) != sorted(self.texts):
            raise ValueError(
                f"conditioning.texts has {sorted(conditioning.texts)}, the static buffers hold {sorted(self.texts)}"
            )
        for name, text in conditioning.texts.items():
            self._copy_tree(f"conditioning.texts[{name!r}]", text, self.texts[name], cast=True)
        self._copy_tree("conditioning.rope", conditioning.rope, self.rope, cast=False)
        self.conditioning_generation = generation

    @staticmethod
    def _copy_tree(name: str, source, static, *, cast: bool) -> None:
        src, dst = trees.leaves(source), trees.leaves(static)
        if [p for p, _ in src] != [p for p, _ in dst]:
            raise ValueError(f"{name} has fields {[p for p, _ in src]}, expected {[p for p, _ in dst]}")
        for (path, s), (_, d) in zip(src, dst):
            if isinstance(d, Tensor):
                check_like(f"{name}.{path}", s, d, cast=cast)
                d.copy_(s)
            elif s != d:
                raise ValueError(f"{name}.{path} is {s!r}, the captured graphs baked in {d!r}")

    def load(self, video: Tensor, audio: Tensor, sigma: float) -> None:
        """Write one evaluation's inputs: two device copies (casting to the model dtype) and one fill.

        A tensor that already is the static buffer (same address and dtype) is not copied, so a caller that
        works in the static buffers directly pays nothing.
        """
        check_like("video", video, self.video, cast=True)
        check_like("audio", audio, self.audio, cast=True)
        value = check_host_float(sigma)
        for src, dst in ((video, self.video), (audio, self.audio)):
            if src.data_ptr() != dst.data_ptr() or src.dtype != dst.dtype:
                dst.copy_(src)
        self.sigma.fill_(value)  # host float -> kernel argument; nothing is read back

    def model_args(self, text: str) -> ModelArgs:
        """Positional forward arguments for a pass reading text `text`; a batch-1 context is expanded to B (a view
        of the static buffer, as the eager executor does)."""
        if text not in self.texts:
            raise ValueError(f"pass reads text {text!r}, but the conditioning has texts {sorted(self.texts)}")
        context = self.texts[text]
        b = self.video.shape[0]
        video_ctx, audio_ctx = (t if t.shape[0] == b else t.expand(b, -1, -1) for t in (context.video, context.audio))
        return ModelArgs(self.video, self.audio, video_ctx, audio_ctx, self.sigma, self.rope)

    @property
    def nbytes(self) -> int:
        """Device bytes held by all static buffers of this signature."""
        return sum(trees.tree_bytes(t) for t in (self.video, self.audio, self.sigma, self.texts, self.rope))
