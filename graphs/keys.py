"""Graph keys: every value a captured pass has baked in, as one hashable, printable record.

A CUDA graph freezes what the forward did on the host while it was captured: the Python branches taken
(skip options), the shapes and dtypes of every kernel, the addresses of the weights and of the static
buffers, the compiled code chosen by torch.compile. A replay with any of those changed would silently
compute the wrong thing, so each of them is a field here and a change is a cache miss, never a stale replay:

- the pass: its name (each pass has its own held outputs), the text it reads, every forward keyword option,
  and its text keys/values role (`TextKVRole`: a graph that reads another pass's held keys/values baked
  in their address, so the role names that pass);
- the inputs: device, shape and dtype of the latents, of each text context and of every RoPE table leaf;
- the model: identity (id, class, config, attention backend, forward hooks, its submodules' classes and
  instance-level `forward`s, the torch settings that pick its kernels, CUDA autocast), weights state, compile mode.

What a key cannot see: Python attributes a forward reads (a block's `eps`, an AdaLN's `rows`), which a capture
freezes like everything else on the host. A model whose such attributes change exposes them in `graph_key_extra`.

`explain_miss` names the fields that differ from the nearest cached key, so a miss says what changed.
Building a key reads host metadata only (shapes, dtypes, version counters, data pointers): no host sync.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules import module as nn_module

from graphs import trees

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _hashable(value: Any) -> Hashable:
    """`value` itself when hashable, otherwise its repr (a config dict must still make a key)."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _freeze(value: Any) -> Hashable:
    """Option values as hashables: lists/sets of block indices become tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value))
    return _hashable(value)


@dataclasses.dataclass(frozen=True, repr=False)
class TensorSig:
    """Shape and dtype of one tensor (its device is the key's device)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: Tensor) -> TensorSig:
        return cls(tuple(tensor.shape), tensor.dtype)

    def __str__(self) -> str:
        name = _DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))
        return f"{name}[{','.join(str(s) for s in self.shape)}]"

    __repr__ = __str__


def _describe(tree: Any, dtype: torch.dtype | None = None) -> tuple[tuple[str, Hashable], ...]:
    """(path, TensorSig or plain value) for every leaf: the hashable shape of a container of tensors.
    With `dtype`, tensors are described in that dtype (the dtype their static copy has)."""
    return tuple(
        (path, TensorSig(tuple(v.shape), dtype or v.dtype) if isinstance(v, Tensor) else _hashable(v))
        for path, v in trees.leaves(tree)
    )


@dataclasses.dataclass(frozen=True)
class InputSignature:
    """Everything about the inputs of one evaluation that a capture bakes in. One set of static buffers
    (`graphs.buffers.StaticInputs`) exists per signature, shared by all pass graphs of that signature.

    Latents and text contexts are described in the model dtype: the executor casts them into static buffers
    of that dtype (as the eager executor casts), so the caller's dtype is not baked into any graph. RoPE
    tables are passed to the model as they are and keep their own dtype.
    """

    device: str
    video: TensorSig  # [B, Nv, C]
    audio: TensorSig  # [B, Na, C]
    texts: tuple[tuple[str, tuple[tuple[str, Hashable], ...]], ...]  # per text name: its leaves' signatures
    rope: tuple[tuple[str, Hashable], ...]

    @classmethod
    def of(cls, video: Tensor, audio: Tensor, conditioning: Any, dtype: torch.dtype) -> InputSignature:
        """Signature of latents plus a `pipeline.executor.Conditioning` (texts mapping and rope tables),
        for a model computing in `dtype`."""
        texts = tuple((name, _describe(conditioning.texts[name], dtype)) for name in sorted(conditioning.texts))
        return cls(
            str(video.device),
            TensorSig(tuple(video.shape), dtype),
            TensorSig(tuple(audio.shape), dtype),
            texts,
            _describe(conditioning.rope),
        )

    def fields(self) -> dict[str, Hashable]:
        out: dict[str, Hashable] = {"device": self.device, "video": self.video, "audio": self.audio}
        for name, items in self.texts:
            out.update({f"text[{name}].{path}": sig for path, sig in items})
        out.update({f"rope.{path}": sig for path, sig in self.rope})
        return out


# Per module with hooks: (name, forward pre-hook handle ids, forward hook handle ids); see `WeightsProbe.code`
Hooks = tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]


def torch_settings() -> tuple[tuple[str, Hashable], ...]:
    """The torch switches that decide which kernels a forward launches: the SDPA backends allowed (a model on
    attention backend "auto" leaves the choice to them), the BLAS library, float32 precision (TF32) and
    reduced-precision reductions, deterministic algorithms, and CUDA autocast (thread-local: it would cast a
    float32 model's matmuls during the capture and never again). A capture bakes in the kernels they picked. Host
    reads only; the float32 precision through the `fp32_precision` API, which reads whichever API set it (the
    legacy `allow_tf32` getters raise once the new API was used)."""
    cuda, matmul = torch.backends.cuda, torch.backends.cuda.matmul
    autocast = torch.is_autocast_enabled("cuda")
    return (
        ("sdp_flash", cuda.flash_sdp_enabled()),
        ("sdp_efficient", cuda.mem_efficient_sdp_enabled()),
        ("sdp_cudnn", cuda.cudnn_sdp_enabled()),
        ("sdp_math", cuda.math_sdp_enabled()),
        ("blas", str(cuda.preferred_blas_library())),
        ("matmul_fp32_precision", matmul.fp32_precision),
        ("cudnn_fp32_precision", torch.backends.cudnn.conv.fp32_precision),
        ("matmul_bf16_reduced_reduction", _hashable(matmul.allow_bf16_reduced_precision_reduction)),
        ("matmul_fp16_reduced_reduction", _hashable(matmul.allow_fp16_reduced_precision_reduction)),
        ("deterministic", torch.are_deterministic_algorithms_enabled()),
        ("autocast_cuda", str(torch.get_autocast_dtype("cuda")) if autocast else False),
    )


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """Which model a graph was captured from: the object (graphs read its weights by address), its class and
    config (what the forward does), its attention backend if it has a switchable one, `graph_key_extra`: any
    hashable a model exposes for other host-side state its forward bakes into a capture (e.g. an adapter's
    per-grid Python numbers or cached coordinate tensors replaced per grid), its forward hooks and the code of
    its submodules (a capture records what they ran; a replay runs no Python, so a hook added or removed later, a
    submodule's class changed in place or a `forward` set on an instance would be silently ignored;
    `WeightsProbe.code`) and the `torch_settings` of the moment."""

    model_id: int
    model_class: str
    config: Hashable
    attention_backend: Hashable
    extra: Hashable = None
    hooks: Hooks = ()
    module_code: int = 0
    settings: tuple[tuple[str, Hashable], ...] = ()

    def fields(self) -> dict[str, Hashable]:
        return {
            "model": f"{self.model_class}@{self.model_id:#x}",
            "config": self.config,
            "attention_backend": self.attention_backend,
            "graph_key_extra": self.extra,
            "hooks": self.hooks,
            "module_code": _short_hash(self.module_code),
            **{f"torch.{name}": value for name, value in self.settings},
        }

    @classmethod
    def of(cls, model: nn.Module, probe: WeightsProbe | None = None) -> ModelIdentity:
        """The identity of `model` now; hooks and module code from its `WeightsProbe` (which keeps the module tree
        walked), or from a walk here."""
        probe = WeightsProbe(model) if probe is None else probe
        return cls(
            id(model),
            type(model).__name__,
            _hashable(getattr(model, "config", None)),
            _hashable(getattr(model, "attention_backend", None)),
            _hashable(getattr(model, "graph_key_extra", None)),
            *probe.code(),
            torch_settings(),
        )


@dataclasses.dataclass(frozen=True)
class WeightsState:
    """A cheap fingerprint of the weights, computed once per evaluation (not per pass).

    - `version`: `model.weights_version` (loaders bump it when they load or change weights);
    - `param_versions`: the sum of the in-place version counters of the parameters and of the buffers a module
      names in `weight_buffers` (weights kept as buffers, e.g. FP8 weights and their scales; other buffers, such
      as coordinates a forward may rewrite, are not weights): an in-place edit such as `p.add_(...)` or
      `load_state_dict` under `no_grad` bumps it. An edit through `p.data` or a NumPy view bumps no counter and
      is not seen; it needs no new capture either, since graphs read the weights' memory as it is at replay (no
      graph keeps a copy or a product of a weight);
    - `weight_storage`: a hash of the weights' data pointers, shapes, strides and dtypes (a replaced weight
      moves, or is re-viewed in place through `.data`, and a graph would keep reading the old memory as the old
      shape);
    - `buffer_storage`: the same of the other buffers. Unlike weights, their addresses can come back (a peer
      model switching between grids rebinds its coordinate buffers), so they key graphs but never drop any
      (`graphs.executor`).
    Reads host metadata only; inference-mode tensors have no version counter and count as 0.
    """

    version: int
    param_versions: int
    weight_storage: int
    buffer_storage: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> WeightsState:
        return WeightsProbe(model)()

    def fields(self) -> dict[str, Hashable]:
        return {"weights_version": self.version, "param_versions": self.param_versions,
                "weight_storage": _short_hash(self.weight_storage), "buffer_storage": _short_hash(self.buffer_storage)}

    def same_weights(self, other: WeightsState) -> bool:
        """The same loaded weights: what a load, an in-place edit or a replaced weight moves, ignoring the other
        buffers' addresses (`buffer_storage`), which can return to a cached value. The executor drops its graphs
        when no cached key has the same weights as now."""
        return (self.version, self.param_versions, self.weight_storage) == (
            other.version, other.param_versions, other.weight_storage)


def _short_hash(value: int) -> str:
    """A hash as 12 hex digits, for miss messages."""
    return f"{value & 0xFFFFFFFFFFFF:012x}"


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version
        return 0


_TENSOR = torch._C.TensorBase  # its getters skip a Parameter's __torch_function__: ~5x faster per read


def _placement(tensors: list[Tensor]) -> int:
    """A hash of where and as what `tensors` live: data pointers, shapes, strides, dtypes (column by column:
    ~1 us per tensor, where a tuple per tensor took several)."""
    return hash((tuple(map(_TENSOR.data_ptr, tensors)), tuple(map(_TENSOR.shape.__get__, tensors)),
                 tuple(map(_TENSOR.stride, tensors)), tuple(map(_TENSOR.dtype.__get__, tensors))))


class WeightsProbe:
    """Computes `WeightsState` of one model quickly, and what its modules run (`code`: hooks, classes) from the
    same walk.

    Walking the module tree (`model.parameters()`) costs ~10 ms for a 48-block model; the probe walks it once
    and keeps each parameter's slot (its module's `_parameters` dict and name), so a parameter replaced by
    assignment or `load_state_dict(assign=True)` is still seen, at ~1 us per weight. It also keeps the tree's
    layout (each module's children, class, instance-level `forward` and parameter/buffer counts) and walks again
    when that changed: a submodule swapped in (`model.video_out = nn.Linear(...)`, an adapter wrapping a Linear)
    brings parameters the old slots never see, and a graph would go on reading the old module's weights.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._walk()

    def _walk(self) -> None:
        named = list(self.model.named_modules())
        modules = [m for _, m in named]
        self._named = named
        self._layout = [(m, dict(m._modules), _code(m), len(m._parameters), len(m._buffers)) for m in modules]
        # By identity (an instance `forward` may be unhashable); the layout keeps each object alive, so no id is reused.
        self._module_code = hash(tuple((cls, id(forward)) for _, _, (cls, forward), _, _ in self._layout))
        # Every parameter slot, None ones too: a bias set later on a Linear built without one is read at its slot.
        # Then the buffers a module names as weights (`weight_buffers`).
        self._weights = [(m._parameters, n) for m in modules for n in m._parameters]
        weight_buffers = {(id(m), n) for m in modules for n in getattr(m, "weight_buffers", ()) if n in m._buffers}
        self._weights += [(m._buffers, n) for m in modules for n in m._buffers if (id(m), n) in weight_buffers]
        self._buffers = [(m._buffers, n) for m in modules for n in m._buffers if (id(m), n) not in weight_buffers]

    def _layout_changed(self) -> bool:
        """Children swapped, added or removed, a module's class or instance `forward` changed, or parameters/buffers
        added or removed (a rename keeping the count shows as a missing slot in `__call__`)."""
        return any(m._modules != children or any(a is not b for a, b in zip(_code(m), code))
                   or len(m._parameters) != params or len(m._buffers) != buffers
                   for m, children, code, params, buffers in self._layout)

    def __call__(self) -> WeightsState:
        if self._layout_changed():
            self._walk()
        try:
            return self._state()
        except KeyError:  # a parameter or buffer renamed since the walk
            self._walk()
            return self._state()

    def _state(self) -> WeightsState:
        weights = [t for t in (slots[name] for slots, name in self._weights) if t is not None]  # None: set after walk
        buffers = [t for t in (slots[name] for slots, name in self._buffers) if t is not None]
        return WeightsState(int(getattr(self.model, "weights_version", 0)), sum(map(_version, weights)),
                            _placement(weights), _placement(buffers))

    def code(self) -> tuple[Hooks, int]:
        """What the modules run besides their weights, after one layout check (a change walks again first):

        - the forward hooks: (module name, pre-hook handles, hook handles) of each module that has any, with "*" for
          the global module hooks (`nn.modules.module.register_module_forward_hook`). Handles are unique per
          registration, so a hook removed and added again reads as a change;
        - a hash of every module's class and instance-level `forward` (if one was set on the object), in tree order.
        """
        if self._layout_changed():
            self._walk()
        found = [(name, tuple(m._forward_pre_hooks), tuple(m._forward_hooks))
                 for name, m in self._named if m._forward_pre_hooks or m._forward_hooks]
        if nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks:
            found.append(("*", tuple(nn_module._global_forward_pre_hooks), tuple(nn_module._global_forward_hooks)))
        return tuple(found), self._module_code


def _code(module: nn.Module) -> tuple[type, Any]:
    """What decides a module's forward besides its weights and hooks: its class, and a `forward` set on the instance
    (None if none). Both are compared by identity."""
    return type(module), module.__dict__.get("forward")


def pass_options(spec: Any) -> tuple[tuple[str, Hashable], ...]:
    """A pass spec's forward keyword options (`spec.model_kwargs()`), sorted and hashable."""
    return tuple(sorted((name, _freeze(value)) for name, value in spec.model_kwargs().items()))


def active_options(options: tuple[tuple[str, Hashable], ...]) -> str:
    """The options that do something ("skip_video_self_attn_blocks=(28,), ..."), for names in messages and roles."""
    return ", ".join(f"{name}={value}" for name, value in options if value)


@dataclasses.dataclass(frozen=True)
class TextKVRole:
    """What a pass does with its text's keys/values: "own" (projects them itself), "produce" (projects them and
    holds them for the later passes of its text) or "consume" (reads those held by `producer`: the producing
    pass's name and active options, e.g. "cond" or "perturbed(skip_video_self_attn_blocks=(28,))", since a producer
    with other options holds other tensors). Printed as "own", "produce" or "consume:<producer>"."""

    kind: str = "own"
    producer: str = ""

    KINDS: ClassVar[tuple[str, ...]] = ("own", "produce", "consume")  # also the capture order (`capture_rank`)

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS or (self.kind == "consume") != bool(self.producer):
            raise ValueError(f"text K/V role must be 'own', 'produce' or 'consume' with a producer, got "
                             f"kind={self.kind!r}, producer={self.producer!r}")

    @classmethod
    def reading(cls, producer: str, options: tuple[tuple[str, Hashable], ...]) -> TextKVRole:
        """The role of a pass reading the keys/values that pass `producer` with these options (`pass_options`)
        holds."""
        active = active_options(options)
        return cls("consume", producer + (f"({active})" if active else ""))

    @property
    def consumes(self) -> bool:
        return self.kind == "consume"

    @property
    def produces(self) -> bool:
        return self.kind == "produce"

    @property
    def capture_rank(self) -> int:
        """Where a new graph of this role goes in the capture (and so replay) order: passes projecting their own
        text keys/values first, then producers, then consumers (which read a producer's held tensors).

        Why own before produce: an "own" pass's keys/values are temporaries of its graph, free again once it is
        captured, so a producer captured after it can place the keys/values it holds on them. Captured the other
        way round, both sets live in the pool at once: at `ltx2.3` scale with 1024 text tokens, 1.1 GiB more (the
        neg pass of the HQ preset). The price is a rule the executor keeps: replaying the "own" pass after the
        producer invalidates the held keys/values (`graphs.executor`)."""
        return self.KINDS.index(self.kind)

    def phrase(self, text: str) -> str:
        """The role in a progress line (`GraphKey.short`); empty for "own"."""
        if self.produces:
            return f" [holds the {text} text K/V for the passes after it]"
        return f" [reads the {text} text K/V held by {self.producer}]" if self.consumes else ""

    def __str__(self) -> str:
        return f"consume:{self.producer}" if self.consumes else self.kind


OWN = TextKVRole()


@dataclasses.dataclass(frozen=True)
class GraphKey:
    """One captured pass. Equal keys may share a graph; any differing field is a miss."""

    pass_name: str
    text: str
    options: tuple[tuple[str, Hashable], ...]
    inputs: InputSignature
    model: ModelIdentity
    weights: WeightsState
    compile_mode: str  # "off" | "default" | "max-autotune-no-cudagraphs"
    text_kv_role: TextKVRole = OWN

    @classmethod
    def make(
        cls, spec: Any, inputs: InputSignature, model: ModelIdentity, weights: WeightsState, compile_mode: str,
        text_kv_role: TextKVRole = OWN,
    ) -> GraphKey:
        """Key of `spec` (a `pipeline.passes.PassSpec`) for these inputs, model, weights, compile mode and text
        keys/values role."""
        if not isinstance(text_kv_role, TextKVRole):
            raise ValueError(f"text_kv_role must be a TextKVRole, got {text_kv_role!r}")
        return cls(spec.name, spec.text, pass_options(spec), inputs, model, weights, compile_mode, text_kv_role)

    def fields(self) -> dict[str, Hashable]:
        """Flat name -> value view, the unit `explain_miss` compares."""
        out: dict[str, Hashable] = {"pass": self.pass_name, "text": self.text, "text_kv": str(self.text_kv_role)}
        out.update(dict(self.options))
        out.update(self.inputs.fields())
        out.update(self.model.fields())
        out.update(self.weights.fields())
        out["compile"] = self.compile_mode
        return out

    def short(self) -> str:
        """One phrase for progress lines: the pass, its active options and the latent shapes."""
        active = active_options(self.options)
        opts = f" ({active})" if active else ""
        role = self.text_kv_role.phrase(self.text)
        return f"{self.pass_name}{opts}{role} video {self.inputs.video} audio {self.inputs.audio}"

    def __str__(self) -> str:
        return (
            f"GraphKey({self.short()}, text {self.text!r} on {self.inputs.device}, "
            f"{self.model.model_class}@{self.model.model_id:#x}, weights v{self.weights.version}, "
            f"compile {self.compile_mode})"
        )


def key_difference(a: GraphKey, b: GraphKey) -> list[tuple[str, Any, Any]]:
    """(field, value in a, value in b) for each flat field that differs; a missing field reads '<absent>'."""
    fa, fb = a.fields(), b.fields()
    names = list(fa) + [n for n in fb if n not in fa]
    absent = "<absent>"
    return [(n, fa.get(n, absent), fb.get(n, absent)) for n in names if fa.get(n, absent) != fb.get(n, absent)]


def nearest_key(key: GraphKey, cached: Iterable[GraphKey]) -> GraphKey | None:
    """The cached key with the fewest differing fields (same pass name preferred on ties)."""
    candidates = list(cached)
    if not candidates:
        return None
    return min(candidates, key=lambda c: (len(key_difference(key, c)), c.pass_name != key.pass_name))


def explain_miss(key: GraphKey, cached_keys: Iterable[GraphKey] | Mapping[GraphKey, Any]) -> str:
    """Why `key` is not cached: the fields that differ from the nearest cached key, with both values."""
    cached = list(cached_keys)
    near = nearest_key(key, cached)
    if near is None:
        return f"no graph for {key.short()}: no graph has been captured yet"
    diffs = key_difference(key, near)
    if not diffs:
        return f"{key.short()} is cached"
    parts = "; ".join(f"{name}: {mine!r} (cached: {theirs!r})" for name, mine, theirs in diffs)
    return (
        f"no graph for {key.short()}; the nearest of {len(cached)} cached key(s) "
        f"[{near.short()}] differs in {len(diffs)} field(s): {parts}"
    )
