"""Counted cost: an op-level tracer and our own MAC formulas, aggregated per layer.

``trace(model, x)`` runs one inference under a ``TorchDispatchMode`` and records every aten op
with the leaf module it ran in and the tensors it read and wrote.  ``count(model, x)`` turns the
trace into a per-layer table: params, nonzero_params, MACs, ideal sparse MACs, bits and BitOps.

MACs here are per inference *at the batch of example_input*.  DESIGN.md defines MACs at batch 1;
``survey_lib.cost.profile`` therefore traces ``example_input[:1]``.  FLOPs = 2 x MACs.

FFTs (structured layers such as ``methods.compact.CirculantLinear``) are counted by a convention, in real
MACs. A complex FFT of length n is taken as a radix-2 FFT: (n/2)·⌈log2 n⌉ butterflies, each one complex
multiply = 4 real multiplies, whose accumulates are the butterfly's additions, so 2·n·⌈log2 n⌉ real MACs
(``_fft_c2c``). A real transform (``_fft_r2c``, ``_fft_c2r``) packs its n real values into an n/2-point
complex FFT and counts half: n·⌈log2 n⌉. Over several dims each dim counts in turn (row-column): N·Σ_d
⌈log2 n_d⌉ for a real transform of N real values (twice that for a complex one), where N includes the batch
and the dims not transformed. Lengths that are not powers of two get the radix-2 count rounded up. The
elementwise product of two complex tensors (the spectral product of an FFT convolution) counts 4 real MACs
per output element; every other elementwise op, real multiplies included (BatchNorm, scaling), counts none.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import pandas as pd
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .._validate import check_int, check_mapping, check_model, check_type
from .._validate import run_forward as _run_forward

TOP = "(top)"
Bits = dict[str, tuple[int, int]]
MAX_BITS = 64  # bits per value a layer may be counted at (fp64)


# --------------------------------------------------------------------------- trace records


@dataclass(frozen=True)
class TensorInfo:
    """One tensor an op read or wrote: shape, dtype, bytes and the storage it lives in."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # numel x element size of this (possibly viewed) tensor
    storage: int  # untyped_storage().data_ptr(): identity of the storage during the trace
    storage_nbytes: int
    is_param: bool  # the storage belongs to a parameter or buffer of the model

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_bits(self) -> int:
        return dtype_bits(self.dtype)


@dataclass
class OpRecord:
    """One aten op of the trace, the module it ran in, its tensors and its counted MACs."""

    index: int
    op: str  # e.g. "aten.convolution.default"
    module: str  # leaf module name, or the innermost module for ops outside leaves, or "(top)"
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    macs: int = 0
    mac_operands: tuple[TensorInfo, TensorInfo] | None = None  # the two multiplied tensors


@dataclass
class OpTrace:
    """Everything one traced inference did, in order, plus what the model owns."""

    ops: list[OpRecord]
    input_storages: set[int]
    output_storages: set[int]
    param_storages: dict[int, str]  # storage -> parameter/buffer name
    modules: dict[str, str]  # module name -> type name, in named_modules order ("" -> "(top)")
    leaves: set[str]
    batch: int

    def ops_of(self, module: str) -> list[OpRecord]:
        """The ops recorded under ``module``."""
        return [o for o in self.ops if o.module == module]


# --------------------------------------------------------------------------- helpers


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits of one element of ``dtype`` (fp32 -> 32, int8 -> 8, bool -> 8)."""
    check_type("dtype", dtype, torch.dtype, "a torch.dtype (e.g. torch.float32)")
    if dtype == torch.bool:
        return 8
    if dtype.is_floating_point or dtype.is_complex:
        return torch.finfo(dtype).bits * (2 if dtype.is_complex else 1)
    try:
        return torch.iinfo(dtype).bits
    except TypeError:
        return torch.empty((), dtype=dtype).element_size() * 8


def module_name(name: str) -> str:
    """Display name of a module: the empty root name becomes "(top)"."""
    check_type("name", name, str, "a module name (str)")
    return name if name else TOP


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's training flag afterwards."""
    flags = [(m, m.training) for m in check_model(model).modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in flags:
            m.training = was


def check_example_input(example_input: Any) -> torch.Tensor:
    """Raise TypeError unless ``example_input`` is a tensor with a batch dimension."""
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() == 0:
        raise ValueError("example_input must have a batch dimension (dim 0), got a 0-d tensor")
    if example_input.shape[0] < 1:
        raise ValueError(f"example_input must hold at least one example (batch >= 1), got shape {tuple(example_input.shape)}")
    return example_input


def run_forward(model: nn.Module, example_input: torch.Tensor) -> Any:
    """Call ``model(example_input)``; a shape/dtype mismatch becomes a ValueError naming the input."""
    return _run_forward(model, example_input, "example_input")


# --------------------------------------------------------------------------- MAC formulas


def _conv_macs(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, transposed: bool) -> int:
    # Normal conv, weight (Cout, Cin/g, *k): N * Cout * prod(out spatial) * Cin/g * prod(k).
    # Transposed conv, weight (Cin, Cout/g, *k): every input pixel scatters Cout/g * prod(k) MACs.
    spatial = x.shape[2:] if transposed else out.shape[2:]
    batch = x.shape[0] if x.dim() == w.dim() else 1  # unbatched conv input has no N
    return batch * math.prod(w.shape) * math.prod(spatial)


def _mm_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    # (m, k) @ (k, n): m * n * k
    return a.shape[0] * a.shape[1] * b.shape[1]


def _bmm_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    # (B, m, k) @ (B, k, n): B * m * n * k
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _sdpa_macs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    # softmax(Q K^T) V: (.., Lq, d) x (.., Lk, d) -> Lq*Lk*d, then (.., Lq, Lk) x (.., Lk, dv)
    lead = math.prod(q.shape[:-2])
    return lead * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def op_macs(op: str, args: tuple, out: Any) -> tuple[int, tuple[torch.Tensor, torch.Tensor] | None]:
    """Counted MACs of one aten op and the two operand tensors it multiplies (bias adds excluded)."""
    check_type("op", op, str, 'an aten op name such as "aten.mm.default"')
    check_type("args", args, (tuple, list), "the op's positional arguments (a tuple)")
    try:
        return _op_macs(op, args, out)
    except (AttributeError, IndexError, TypeError) as err:
        raise TypeError(f"args do not hold the tensor operands of {op} ({err})") from err


def _fft_macs(name: str, x: torch.Tensor, dims: Any, out: torch.Tensor) -> int:
    # The real (full) side of the transform: the input of r2c and c2c, the output of c2r (module docstring).
    full = out if name == "_fft_c2r" else x
    per_value = 2 if name == "_fft_c2c" else 1
    log_lengths = sum(math.ceil(math.log2(full.shape[d])) for d in dims if full.shape[d] > 1)
    return per_value * full.numel() * log_lengths


FFT_OPS = ("_fft_r2c", "_fft_c2r", "_fft_c2c")
COMPLEX_MUL_MACS = 4  # real MACs of one complex multiply


def _op_macs(op: str, args: tuple, out: Any) -> tuple[int, tuple[torch.Tensor, torch.Tensor] | None]:
    name = op.split(".")[1] if op.startswith("aten.") else ""
    if name in FFT_OPS:  # the constants (twiddles) are not tensors: the output stands for both operands
        return _fft_macs(name, args[0], args[1], out), (out, out)
    if name in ("mul", "mul_") and all(isinstance(a, torch.Tensor) and a.is_complex() for a in args[:2]):
        return COMPLEX_MUL_MACS * out.numel(), (args[0], args[1])
    if name in ("convolution", "_convolution"):
        x, w = args[0], args[1]
        o = out[0] if isinstance(out, (tuple, list)) else out
        return _conv_macs(x, w, o, bool(args[6])), (x, w)
    if name == "mm":
        return _mm_macs(args[0], args[1]), (args[0], args[1])
    if name == "addmm":
        return _mm_macs(args[1], args[2]), (args[1], args[2])
    if name == "bmm":
        return _bmm_macs(args[0], args[1]), (args[0], args[1])
    if name == "baddbmm":
        return _bmm_macs(args[1], args[2]), (args[1], args[2])
    if name == "mv":
        return args[0].shape[0] * args[0].shape[1], (args[0], args[1])
    if name == "addmv":
        return args[1].shape[0] * args[1].shape[1], (args[1], args[2])
    if name in ("dot", "vdot"):
        return args[0].shape[0], (args[0], args[1])
    if name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
        return _sdpa_macs(args[0], args[1], args[2]), (args[0], args[1])
    return 0, None


# --------------------------------------------------------------------------- the tracer


class _Tracer(TorchDispatchMode):
    """Records every aten op with the current module; holds strong refs so storages stay unique."""

    def __init__(self, param_storages: dict[int, str]):
        super().__init__()
        self.stack: list[str] = []
        self.ops: list[OpRecord] = []
        self.keep: list[torch.Tensor] = []
        self.param_storages = param_storages

    def info(self, t: torch.Tensor) -> TensorInfo:
        self.keep.append(t)
        st = t.untyped_storage()
        ptr = st.data_ptr()
        return TensorInfo(
            shape=tuple(t.shape),
            dtype=t.dtype,
            nbytes=t.numel() * t.element_size(),
            storage=ptr,
            storage_nbytes=st.nbytes(),
            is_param=ptr in self.param_storages and st.nbytes() > 0,
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = str(func)  # "aten.convolution.default"
        tin = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        tout = [a for a in pytree.tree_leaves(out) if isinstance(a, torch.Tensor)]
        macs, operands = _op_macs(op, args, out)
        rec = OpRecord(
            index=len(self.ops),
            op=op,
            module=self.stack[-1] if self.stack else TOP,
            inputs=[self.info(t) for t in tin],
            outputs=[self.info(t) for t in tout],
            macs=int(macs),
            mac_operands=(self.info(operands[0]), self.info(operands[1])) if operands else None,
        )
        self.ops.append(rec)
        return out


def _storage_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if t is not None and t.numel() > 0:
            names.setdefault(t.untyped_storage().data_ptr(), n)
    return names


def is_onnx_model(model: Any) -> bool:
    """True for a model that runs an ONNX file in ONNX Runtime (it has an ``onnx_path`` attribute)."""
    return getattr(model, "onnx_path", None) is not None


def trace(model: nn.Module, example_input: torch.Tensor) -> OpTrace:
    """Run one inference (eval, no_grad) and record every aten op with its module and tensors."""
    check_model(model)
    if is_onnx_model(model):  # its ops run inside ONNX Runtime, unseen by torch
        raise TypeError(f"model is an ONNX Runtime model ({type(model).__name__}); its ops cannot be traced or counted: "
                        "count the torch model it was exported from instead")
    # A copy with its own storage: a slice of a larger tensor would count the whole dataset as live.
    example_input = check_example_input(example_input).detach().clone()
    param_storages = _storage_names(model)
    tracer = _Tracer(param_storages)
    modules = {module_name(n): type(m).__name__ for n, m in model.named_modules()}
    leaves = {module_name(n) for n, m in model.named_modules() if not any(True for _ in m.children())}
    handles = []

    def pre(name: str):
        return lambda mod, inp: tracer.stack.append(name)

    def post(mod, inp, out):
        if tracer.stack:
            tracer.stack.pop()

    for n, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(module_name(n))))
        handles.append(m.register_forward_hook(post, always_call=True))
    try:
        with eval_mode(model), torch.no_grad():
            input_ptr = example_input.untyped_storage().data_ptr()
            with tracer:
                out = run_forward(model, example_input)
            outputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
    finally:
        for h in handles:
            h.remove()
    result = OpTrace(
        ops=tracer.ops,
        input_storages={input_ptr},
        output_storages=outputs,
        param_storages=param_storages,
        modules=modules,
        leaves=leaves,
        batch=int(example_input.shape[0]),
    )
    tracer.keep.clear()  # storages were unique while the trace ran; ids are plain ints from here
    return result


# --------------------------------------------------------------------------- per-layer table


def _owned_params(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Parameters per module (direct children only), each parameter assigned to one module only."""
    seen: set[int] = set()
    owned: dict[str, list[torch.Tensor]] = {}
    for n, m in model.named_modules():
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                owned.setdefault(module_name(n), []).append(p)
    return owned


def _weight_dtype(params: list[torch.Tensor]) -> torch.dtype | None:
    multi = [p for p in params if p.dim() > 1]
    return (multi or params)[0].dtype if params else None


def _act_dtype(ops: list[OpRecord]) -> torch.dtype | None:
    """Dtype of the layer's activations: the first non-empty floating one, else the first int8/uint8 one."""
    acts = [t for o in ops for t in o.inputs + o.outputs if not t.is_param and t.numel > 0]
    for ok in (lambda d: d.is_floating_point, lambda d: d in (torch.int8, torch.uint8)):
        for t in acts:
            if ok(t.dtype):
                return t.dtype
    return None


def layer_bits(model: nn.Module, tr: OpTrace, bits: Bits | None = None) -> dict[str, tuple[int | None, int | None]]:
    """(weight_bits, act_bits) per layer: ``bits`` argument, else module attributes, else dtype."""
    check_model(model)
    check_trace(tr)
    if bits is not None:
        check_mapping("bits", bits, "a {layer name: (weight_bits, act_bits)} dict")
    bits = dict(bits or {})
    names = set(tr.modules)
    unknown = sorted(set(bits) - names)
    if unknown:
        raise ValueError(f"bits names unknown layers {unknown}; accepted layer names: {sorted(names)}")
    mods = {module_name(n): m for n, m in model.named_modules()}
    if names - set(mods):
        raise ValueError(f"tr was traced from another model: it names layers {sorted(names - set(mods))[:5]} that "
                         "model does not have")
    owned = _owned_params(model)
    out: dict[str, tuple[int | None, int | None]] = {}
    for name in names:
        m = mods[name]
        wd, ad = _weight_dtype(owned.get(name, [])), _act_dtype(tr.ops_of(name))
        w = getattr(m, "weight_bits", None) or (dtype_bits(wd) if wd is not None else None)
        a = getattr(m, "act_bits", None) or (dtype_bits(ad) if ad is not None else None)
        if name in bits:
            pair = bits[name]
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"bits[{name!r}] must be a (weight_bits, act_bits) tuple, got {pair!r}")
            w, a = (check_int(f"bits[{name!r}]", b, min_value=1, max_value=MAX_BITS) for b in pair)
        out[name] = (w, a)
    return out


def tensor_bits(t: TensorInfo, wbits: int | None, abits: int | None) -> int:
    """Bits per element of ``t`` in a layer: its weight or activation bits, else its dtype bits."""
    check_type("t", t, TensorInfo, "a TensorInfo from a trace")
    check_layer_bits(wbits, abits)
    chosen = wbits if t.is_param else abits
    return int(chosen) if chosen else t.dtype_bits


def check_layer_bits(wbits: Any, abits: Any) -> None:
    """TypeError/ValueError unless each of ``wbits``, ``abits`` is None or an int in [1, MAX_BITS]."""
    for param, b in (("wbits", wbits), ("abits", abits)):
        if b is not None:
            check_int(param, b, min_value=1, max_value=MAX_BITS)


def check_trace(tr: Any) -> OpTrace:
    """TypeError unless ``tr`` is an OpTrace (from :func:`trace`)."""
    return check_type("tr", tr, OpTrace, "an OpTrace from trace(model, example_input)")


def _nonzero_fraction(model: nn.Module) -> dict[int, float]:
    frac: dict[int, float] = {}
    for _, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if t is not None and t.numel() > 0:
            frac.setdefault(t.untyped_storage().data_ptr(), float(torch.count_nonzero(t.detach())) / t.numel())
    return frac


def _layer_order(tr: OpTrace, owned: dict[str, list[torch.Tensor]]) -> list[str]:
    order: list[str] = []
    for o in tr.ops:
        if o.module not in order:
            order.append(o.module)
    for name in tr.modules:  # layers that own parameters but ran no op (unused heads, ...)
        if name in owned and name not in order:
            order.append(name)
    return order


def count_trace(model: nn.Module, tr: OpTrace, bits: Bits | None = None) -> pd.DataFrame:
    """Per-layer counted table from an existing trace (see ``count``)."""
    lbits = layer_bits(model, tr, bits)
    owned = _owned_params(model)
    nz = _nonzero_fraction(model)
    rows = []
    for name in _layer_order(tr, owned):
        ps = owned.get(name, [])
        wb, ab = lbits[name]
        macs = ideal = bitops = 0.0
        for o in tr.ops_of(name):
            if not o.macs:
                continue
            a, b = o.mac_operands
            macs += o.macs
            frac = min((nz.get(t.storage, 1.0) for t in (a, b) if t.is_param), default=1.0)
            ideal += o.macs * frac
            bitops += o.macs * tensor_bits(a, wb, ab) * tensor_bits(b, wb, ab)
        rows.append(
            dict(
                name=name,
                type=tr.modules.get(name, ""),
                params=sum(p.numel() for p in ps),
                nonzero_params=sum(int(torch.count_nonzero(p.detach())) for p in ps),
                macs=int(macs),
                ideal_sparse_macs=float(ideal),
                weight_bits=wb if ps else None,
                act_bits=ab,
                bitops=int(bitops),
            )
        )
    df = pd.DataFrame(rows, columns=list(COUNT_COLUMNS))
    df["weight_bits"] = df["weight_bits"].astype("Int64")
    df["act_bits"] = df["act_bits"].astype("Int64")
    df.attrs["kind"] = {c: ("estimated" if c == "ideal_sparse_macs" else "counted") for c in COUNT_COLUMNS[2:]}
    df.attrs["batch"] = tr.batch
    return df


COUNT_COLUMNS = ("name", "type", "params", "nonzero_params", "macs", "ideal_sparse_macs", "weight_bits", "act_bits", "bitops")


def count(model: nn.Module, example_input: torch.Tensor, bits: Bits | None = None) -> pd.DataFrame:
    """Per-layer params, MACs, ideal sparse MACs, bits, BitOps and traffic at example_input's batch."""
    from .memory import traffic_trace  # memory.py builds on this module

    tr = trace(model, example_input)
    df = count_trace(model, tr, bits)
    traffic = traffic_trace(model, tr, bits)
    merged = df.merge(traffic, on="name", how="left")
    for c in traffic.columns.drop("name"):
        merged[c] = merged[c].fillna(0).astype("int64")
    merged.attrs = {**df.attrs, "kind": {**df.attrs["kind"], **{c: "counted" for c in traffic.columns.drop("name")}}}
    return merged


def total_params(model: nn.Module) -> tuple[int, int]:
    """(params, nonzero_params) of ``model``, each parameter counted once even if shared."""
    ps = list(check_model(model).parameters())
    return sum(p.numel() for p in ps), sum(int(torch.count_nonzero(p.detach())) for p in ps)


__all__ = [
    "TensorInfo",
    "OpRecord",
    "OpTrace",
    "trace",
    "is_onnx_model",
    "count",
    "count_trace",
    "op_macs",
    "layer_bits",
    "tensor_bits",
    "check_layer_bits",
    "check_trace",
    "dtype_bits",
    "eval_mode",
    "total_params",
    "TOP",
]
