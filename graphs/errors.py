"""Errors and warnings of the graph layer.

`CaptureError` is raised when a pass cannot be captured (or must not be): a host sync inside the forward, a
device that has no CUDA graphs, an unexpected torch.compile recompile. `GraphMissError` is the strict miss
policy refusing to capture a key it has not seen; it is a `CaptureError` so one `except` catches both.
Bad arguments are plain `ValueError`s, as everywhere in the project.
"""

from __future__ import annotations


class CaptureError(RuntimeError):
    """A CUDA graph could not be captured, or capture is not possible here. The message says the fix."""


class GraphMissError(CaptureError):
    """No graph is cached for a key and the miss policy is "strict". The message names the differing fields."""


class GraphMissWarning(UserWarning):
    """A key missed the graph cache and was captured (policy "capture") or run eagerly (policy "eager")."""
