"""Which torch operations force the host to wait for the device: the rules behind the dispatch detector.

Pure classification, no state: given an aten op (seen by a ``TorchDispatchMode``) or a Python-level torch
call (seen by a ``TorchFunctionMode``) and its arguments, say why it would synchronise the host on a GPU,
or return ``None``. The rules are general, not a list of remembered names:

1. an op whose schema returns a Python value (``bool``/``int``/``float``/``Scalar``...) computed from a
   tensor's *data* (``_local_scalar_dense`` behind ``.item()``/``bool()``/``if t:``/``float()``, ``equal``,
   ``allclose``, ``is_nonzero``, any custom op of that shape); pure metadata queries (``sym_size``,
   ``is_contiguous``, ``_fused_sdp_choice``...) are the known exceptions, listed in ``METADATA_QUERIES``;
2. an op whose output *shape* depends on data (``torch.Tag.dynamic_output_shape`` / ``data_dependent_output``,
   plus a short fallback list for builds without tags): ``nonzero``, ``masked_select``, ``unique``, boolean-mask
   indexing (``aten.index`` with a bool index; integer indices are fine), ``repeat_interleave`` without
   ``output_size``...;
3. copies that cross from device to host (``copy_``/``_to_copy`` to CPU, except a ``non_blocking`` copy into
   pinned memory, which is asynchronous) and blocking host-to-device copies (``non_blocking=False``:
   PyTorch synchronises the stream after them);
4. at the Python level, the calls the dispatcher never sees because they read memory directly or switch
   dispatch modes off: ``.tolist()``, ``.numpy()``/``np.asarray``, printing/formatting (``repr``, ``str``,
   f-strings), ``.cpu()``, ``.to("cpu")`` from a device tensor, and ``torch.tensor(data, device=<gpu>)``.

On a CPU-only run every tensor stands in for device data, so ``.item()`` on a CPU tensor is reported just as
it would be on a GPU. ``.cpu()`` is reported on any device; ``.to(device)`` only when the source is not
CPU, since device-agnostic code writes ``.to(x.device)`` and cannot be told apart from a real move there.
"""

from __future__ import annotations

import torch

# Schema return types that hand a value to Python.
SCALAR_TYPES = frozenset(
    {"bool", "int", "float", "complex", "Scalar", "SymInt", "SymBool", "SymFloat", "number"}
    | {f"{t}[]" for t in ("bool", "int", "float", "Scalar", "SymInt")}
    | {f"List[{t}]" for t in ("bool", "int", "float", "complex", "SymInt")}
)

# Ops returning Python values that read only metadata (shape, strides, flags), never tensor data.
METADATA_QUERIES = frozenset({
    "dim", "numel", "size", "stride", "storage_offset", "dense_dim", "sparse_dim", "_nnz", "_dimI", "_dimV",
    "element_size", "output_nr", "_version", "get_device", "retains_grad", "result_type", "len",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "sym_is_contiguous",
    "is_coalesced", "is_complex", "is_conj", "is_contiguous", "is_distributed", "is_floating_point",
    "is_inference", "is_leaf", "is_neg", "is_non_overlapping_and_dense", "is_pinned", "is_same_size",
    "is_set_to", "is_signed", "is_strides_like_format", "_is_zerotensor",
    "_debug_has_internal_overlap", "_has_compatible_shallow_copy_type", "_has_same_storage_numel",
    "_fused_sdp_choice", "_use_cudnn_ctc_loss", "_use_miopen_ctc_loss", "cudnn_is_acceptable",
    "_nested_get_ragged_idx", "q_per_channel_axis", "q_scale", "q_zero_point",
})

# Fallback for builds whose ops lack the dynamic-shape tags (the tags are the primary source).
DATA_DEPENDENT_SHAPE = frozenset({
    "nonzero", "nonzero_numpy", "masked_select", "unique_consecutive", "unique_dim", "unique_dim_consecutive",
    "_unique", "_unique2", "bincount", "repeat_interleave",
})

# Ops that read a status tensor on the host to decide whether to raise (torch.linalg's `info` checks).
HOST_CHECKS = frozenset({"_linalg_check_errors"})

_MASK_DTYPES = (torch.bool, torch.uint8)
_HOST = "cpu"
_NO_DATA = "meta"  # meta tensors carry no data: never a real transfer


def _op_name(func) -> str:
    return func.overloadpacket.__name__


def _arg(func, args, kwargs, name: str, default=None):
    """Argument `name` of an aten call, whether passed positionally or by keyword."""
    for index, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            return args[index] if index < len(args) else kwargs.get(name, default)
    return default


def has_tensor_arg(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values()))


def _returns_python_value(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(str(r.type) in SCALAR_TYPES for r in returns)


def reads_data_into_python(func, args, kwargs) -> bool:
    """Rule 1: the op returns Python values computed from tensor data."""
    return (
        _op_name(func) not in METADATA_QUERIES
        and has_tensor_arg(args, kwargs)
        and (_returns_python_value(func) or torch.Tag.data_dependent_output in func.tags)
    )


def is_python_value(out) -> bool:
    """What an op handed back is a Python number/bool (or a list of them): checked after the call."""
    if isinstance(out, (list, tuple)):
        return bool(out) and all(is_python_value(x) for x in out)
    return isinstance(out, (bool, int, float, complex))


def _bool_mask_in(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in indices or ())


def _becomes_masked_fill(target: torch.Tensor, indices, values) -> bool:
    """ATen's `index_put_` shortcut (`canDispatchToMaskedFill`): a one-element value held on the host, and exactly
    one index that is a bool/uint8 mask on the target's device, beside any number of None (`t[:, mask] = 0.0`). A
    value on the device (`t[mask] = t.mean()`) takes the nonzero path, which syncs."""
    if not (isinstance(values, torch.Tensor) and values.numel() == 1 and values.device.type == _HOST):
        return False
    given = [i for i in indices if i is not None]
    return (len(given) == 1 and isinstance(given[0], torch.Tensor) and given[0].dtype in _MASK_DTYPES
            and given[0].device == target.device)


def _copy_reason(src: torch.Tensor, dst_device: torch.device, non_blocking: bool, dst_pinned: bool) -> str | None:
    src_type, dst_type = src.device.type, dst_device.type
    if _NO_DATA in (src_type, dst_type) or src_type == dst_type:
        return None
    if dst_type == _HOST:
        if non_blocking and dst_pinned:
            return None  # asynchronous into pinned memory: the host only waits when it reads the data
        return "device->host copy (the host waits for the copy and all work queued before it)"
    if src_type == _HOST and not non_blocking:
        return "blocking host->device copy (non_blocking=False synchronises the stream)"
    return None


def dispatch_reason(func, args, kwargs) -> str | None:
    """Why aten op `func` called with (`args`, `kwargs`) would synchronise the host, or None."""
    name = _op_name(func)
    if name == "_to_copy":
        src = args[0]
        device = kwargs.get("device") or src.device
        non_blocking = bool(kwargs.get("non_blocking", False))
        # _to_copy(non_blocking=True) from CUDA to CPU allocates a pinned destination itself.
        return _copy_reason(src, torch.device(device), non_blocking, dst_pinned=non_blocking)
    if name == "copy_":
        dst, src = args[0], args[1]
        non_blocking = bool(_arg(func, args, kwargs, "non_blocking", False))
        if not isinstance(src, torch.Tensor):
            return None
        pinned = dst.device.type == _HOST and non_blocking and dst.is_pinned()
        return _copy_reason(src, dst.device, non_blocking, dst_pinned=pinned)
    if name == "index":
        if _bool_mask_in(_arg(func, args, kwargs, "indices")):
            return "boolean-mask indexing (output shape depends on data: nonzero under the hood)"
        return None  # integer/tensor indices: static shape, despite the op's dynamic-shape tag
    if name in ("index_put", "index_put_", "_index_put_impl_"):
        indices = _arg(func, args, kwargs, "indices")
        if not _bool_mask_in(indices):
            return None
        values = _arg(func, args, kwargs, "values")
        accumulate = bool(_arg(func, args, kwargs, "accumulate", False))
        if not accumulate and _becomes_masked_fill(args[0], indices, values):
            return None  # t[mask] = host scalar: PyTorch turns this into masked_fill_, no sync
        return "boolean-mask assignment (needs nonzero of the mask)"
    if name == "repeat_interleave" and _arg(func, args, kwargs, "output_size") is not None:
        return None
    if name in HOST_CHECKS:
        return "reads a status tensor on the host to raise an error (torch.linalg's info check)"
    if reads_data_into_python(func, args, kwargs):
        return "hands tensor data to Python (.item()/bool()/if t:/float()/int() or an op returning a Python value)"
    if (
        torch.Tag.dynamic_output_shape in func.tags
        or torch.Tag.data_dependent_output in func.tags
        or name in DATA_DEPENDENT_SHAPE
    ):
        return "output shape depends on data (the host must read the size from the device)"
    return None


# -- Python-level calls the dispatcher cannot see ------------------------------------------------------------

_TENSOR_CLASSES = ("Tensor", "TensorBase")
_TO_PYTHON = {
    "tolist": "Tensor.tolist() copies tensor data into Python",
    "numpy": "Tensor.numpy() hands tensor data to NumPy",
    "__array__": "np.asarray(tensor) hands tensor data to NumPy",
    "__repr__": "printing/formatting a tensor reads its values (print, repr, str, f-string)",
    "__str__": "printing/formatting a tensor reads its values (print, repr, str, f-string)",
    "__format__": "printing/formatting a tensor reads its values (print, repr, str, f-string)",
    "cpu": "Tensor.cpu() copies device data to the host",
}


def api_name(func) -> str:
    """A readable name for a torch callable: ``Tensor.item``, ``torch.tensor``."""
    name = getattr(func, "__name__", None) or str(func)
    owner = getattr(func, "__qualname__", "").split(".")[0]
    return f"Tensor.{name}" if owner in _TENSOR_CLASSES else f"torch.{name}"


def _is_tensor_method(func) -> bool:
    return getattr(func, "__qualname__", "").split(".")[0] in _TENSOR_CLASSES


def _to_target(args, kwargs) -> tuple[torch.device | None, bool]:
    """Target device and non_blocking of ``Tensor.to(...)`` in any of its call forms."""
    device, non_blocking = kwargs.get("device"), bool(kwargs.get("non_blocking", False))
    for arg in args:
        if isinstance(arg, bool):  # the first positional bool is non_blocking
            non_blocking = arg
            break
        if isinstance(arg, torch.Tensor):
            device = arg.device
        elif isinstance(arg, (str, torch.device, int)):
            device = arg
    return (torch.device(device) if device is not None else None), non_blocking


def function_reason(func, args, kwargs) -> str | None:
    """Why a Python-level torch call would synchronise the host, for calls invisible at dispatch, or None."""
    name = getattr(func, "__name__", "")
    if _is_tensor_method(func):
        if name == "new_tensor" and args and isinstance(args[0], torch.Tensor):  # device defaults to self's
            data = args[1] if len(args) > 1 else kwargs.get("data")
            device = torch.device(kwargs["device"]) if kwargs.get("device") is not None else args[0].device
            if not isinstance(data, torch.Tensor) and device.type not in (_HOST, _NO_DATA):
                return f"Tensor.new_tensor(python data) on {device.type!r} is a blocking host->device copy"
            return None
        if name in _TO_PYTHON:
            return _TO_PYTHON[name]
        if name == "to" and args and isinstance(args[0], torch.Tensor):
            device, non_blocking = _to_target(args[1:], kwargs)
            src = args[0].device.type
            if device is not None and device.type == _HOST and src not in (_HOST, _NO_DATA) and not non_blocking:
                return "Tensor.to('cpu') copies device data to the host"
        return None
    if func in (torch.tensor, torch.as_tensor, torch.asarray):
        data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
        device = kwargs.get("device")
        device = torch.device(device) if device is not None else torch.get_default_device()
        if not isinstance(data, torch.Tensor) and device.type not in (_HOST, _NO_DATA):
            return f"{api_name(func)}(python data, device={device.type!r}) is a blocking host->device copy"
    return None
