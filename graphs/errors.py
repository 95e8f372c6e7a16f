"""Errors and warnings of the graph layer.

`CaptureError` is raised when a pass cannot be captured (or must not be): a host sync inside the forward, a
device that has no CUDA graphs, an unexpected torch.compile recompile. `GraphMissError` is a graph that cannot
be replayed: the strict miss policy refusing to capture a key it has not seen, `replay_only`/`pass_graph` asked for
a key with no graph, or a pass whose held text keys/values are no longer valid. It is a `CaptureError` so one
`except` catches both.
Bad arguments are plain `ValueError`s, as everywhere in the project.
"""

from __future__ import annotations


class CaptureError(RuntimeError):
    """A CUDA graph could not be captured, or capture is not possible here. The message says the fix."""


class GraphMissError(CaptureError):
    """No graph can be replayed for a key: none is cached (under the "strict" policy, or asked for by `replay_only`
    or `pass_graph`; the message names the differing fields), or the text keys/values it reads are no longer
    valid (the message names the pass to replay first)."""


class GraphMissWarning(UserWarning):
    """A key missed the graph cache and was captured (policy "capture") or run eagerly (policy "eager")."""
