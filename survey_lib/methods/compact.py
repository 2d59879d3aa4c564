"""Compact and transferred filters, and structural matrices: layers that are cheap by design, not by compression.

Instead of shrinking a trained layer, these methods build it small and train it. The survey of Cheng et al.
(2017) files the first two families under "transferred/compact convolutional filters" and circulant weights
under parameter sharing, as "structural matrices".

**Compact blocks** stand in for a dense 3x3 conv-BN-ReLU of the same ``cin -> cout`` and stride:

* ``depthwise_separable`` (MobileNet v1, :class:`survey_lib.models.DepthwiseSeparable`): a depthwise 3x3 then
  a 1x1: 1/cout + 1/9 of the dense weights and MACs (7.9x fewer at 64 channels). Depthwise convs are
  memory-bound, so the latency gain is smaller than the MAC gain.
* ``fire`` (SqueezeNet, :class:`Fire`): a 1x1 squeeze to a few channels, then parallel 1x1 and 3x3 expands
  concatenated. The squeeze is a bottleneck: few params, but the 3x3 sees only ``squeeze`` channels.
* ``shuffle`` (ShuffleNet v1, :class:`ShuffleBlock`): grouped 1x1 convs around a depthwise 3x3, with a
  channel shuffle so information crosses the groups. Fewest params; many small, memory-bound ops.
* ``inverted_residual`` (MobileNet v2, :class:`InvertedResidual`): 1x1 expand by ``expansion``, depthwise
  3x3, linear 1x1 project. At equal cin/cout with expansion 6 it holds *more* params and MACs than the
  dense conv: it saves only when the network is redesigned around narrow ``cout`` (MobileNet v2's widths).

:func:`swap_blocks` puts one kind in place of every block of a reference backbone but the stem, freshly
initialised; :func:`replace_blocks` (the method) then trains the new model through the context.

**Transferred filters** derive many filters from a few learned ones, so the layer keeps its width with
fewer params: :class:`EquivariantConv2d` (Cohen & Welling 2016: every filter in 4 rotations, or 4 rotations x 2
flips; |G| times fewer params, the same MACs) and :class:`CReLUConv2d` (Shang et al. 2016: a filter and its
negation, half the params and half the MACs).

**Structural matrices**: :class:`CirculantLinear` (Cheng et al. 2015) is an n x n circulant weight, n params
instead of n², applied by FFT in O(n log n). See ``survey_lib.cost.counting`` for how FFT MACs are counted.
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_bool, check_choice, check_int, check_model, check_seed, check_type
from ..models import BasicBlock, DepthwiseSeparable, conv_bn_relu
from ..train import CosineLR
from .base import Context, check_ctx, counted_totals, mark, replace_module

__all__ = [
    "KINDS", "KIND_OPTIONS", "GROUPS", "DepthwiseSeparable", "Fire", "ShuffleBlock", "InvertedResidual",
    "CompactResidual", "channel_shuffle", "compact_block", "Block", "replaceable_blocks", "swap_blocks", "replace_blocks",
    "EquivariantConv2d", "CReLUConv2d", "CirculantLinear", "equal_width_params",
]

KINDS = ("dense", "depthwise_separable", "fire", "shuffle", "inverted_residual")
KIND_OPTIONS = {                       # the keyword options compact_block passes on, per kind
    "dense": (),
    "depthwise_separable": (),
    "fire": ("squeeze",),
    "shuffle": ("groups", "bottleneck"),
    "inverted_residual": ("expansion",),
}
GROUPS = {"p4": 4, "p4m": 8}           # group -> number of transforms of each learned filter
MIN_SQUEEZE = 4                        # Fire's default squeeze width never goes below this


def _check_block_args(cin: Any, cout: Any, stride: Any) -> None:
    check_int("cin", cin, min_value=1)
    check_int("cout", cout, min_value=1)
    check_int("stride", stride, min_value=1)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = None) -> nn.Sequential:
    """Conv (no bias, "same" padding) -> BatchNorm -> ``act`` (none: a linear layer)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act is not None else []))


# ----------------------------------------------------------------------------------------------------------
# compact blocks
# ----------------------------------------------------------------------------------------------------------
class Fire(nn.Module):
    """SqueezeNet's Fire module: 1x1 squeeze conv-BN-ReLU, then 1x1 and 3x3 expand conv-BN-ReLU concatenated.

    Each expand gives ``cout // 2`` channels (``cout`` must be even). ``squeeze`` defaults to
    max(4, cout // 8), SqueezeNet's squeeze ratio 0.125 (fire2: 16 -> 64 + 64). ``stride`` is applied in
    both expands, so the 3x3 branch sees every pixel of the squeezed map (a strided 1x1 squeeze would drop
    3/4 of the input unseen)."""

    def __init__(self, cin: int, cout: int, squeeze: int | None = None, stride: int = 1) -> None:
        _check_block_args(cin, cout, stride)
        if cout % 2:
            raise ValueError(f"cout={cout} must be even: Fire concatenates two expands of cout // 2 channels")
        squeeze = max(MIN_SQUEEZE, cout // 8) if squeeze is None else check_int("squeeze", squeeze, min_value=1)
        super().__init__()
        self.squeeze = conv_bn_relu(cin, squeeze, 1)
        self.expand1 = conv_bn_relu(squeeze, cout // 2, 1, stride=stride)
        self.expand3 = conv_bn_relu(squeeze, cout // 2, 3, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        """cat(expand1(s), expand3(s)) with s = squeeze(x)."""
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], dim=1)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups (ShuffleNet): (B, g·n, H, W) -> channel order n-major."""
    check_int("groups", groups, min_value=1)
    if x.dim() < 2 or x.shape[1] % groups:
        raise ValueError(f"groups={groups} must divide the channel count (dim 1) of x, shape {tuple(x.shape)}")
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleBlock(nn.Module):
    """ShuffleNet v1 unit as a drop-in for a conv-BN-ReLU of ``cin -> cout``.

    Grouped 1x1 conv-BN-ReLU to ``bottleneck`` channels, channel shuffle, depthwise 3x3 conv-BN (carries
    ``stride``), grouped 1x1 conv-BN to ``cout``, plus ``x`` when stride is 1 and cin == cout, then ReLU.
    ``bottleneck`` defaults to cout // 4 (ShuffleNet's ratio) rounded down to a multiple of ``groups``.
    Unlike ShuffleNet's strided unit (average-pool shortcut, concatenation) a strided or widening unit here
    has no shortcut, so its output has exactly ``cout`` channels."""

    def __init__(self, cin: int, cout: int, groups: int = 4, stride: int = 1, bottleneck: int | None = None) -> None:
        _check_block_args(cin, cout, stride)
        check_int("groups", groups, min_value=1)
        if bottleneck is None:
            mid = groups * max(1, cout // (4 * groups))
        else:
            mid = check_int("bottleneck", bottleneck, min_value=1)
        if cin % groups or cout % groups or mid % groups:
            raise ValueError(f"groups={groups} must divide cin={cin}, cout={cout} and bottleneck={mid}; "
                             f"accepted groups: the common divisors, e.g. {math.gcd(cin, cout, mid)}")
        super().__init__()
        self.groups = groups
        self.compress = _conv_bn(cin, mid, 1, groups=groups, act=nn.ReLU)
        self.depthwise = _conv_bn(mid, mid, 3, stride=stride, groups=mid)
        self.expand = _conv_bn(mid, cout, 1, groups=groups)
        self.residual = stride == 1 and cin == cout
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """relu(expand(depthwise(shuffle(compress(x)))) [+ x])."""
        out = self.expand(self.depthwise(channel_shuffle(self.compress(x), self.groups)))
        return self.relu(out + x if self.residual else out)


class InvertedResidual(nn.Module):
    """MobileNet v2 block: 1x1 expand conv-BN-ReLU6 (to cin·expansion; none when expansion is 1), depthwise
    3x3 conv-BN-ReLU6 (carries ``stride``), 1x1 project conv-BN (linear), plus ``x`` when stride 1 and cin == cout."""

    def __init__(self, cin: int, cout: int, expansion: int = 6, stride: int = 1) -> None:
        _check_block_args(cin, cout, stride)
        check_int("expansion", expansion, min_value=1)
        super().__init__()
        hidden = cin * expansion
        self.expand = _conv_bn(cin, hidden, 1, act=nn.ReLU6) if expansion != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden, act=nn.ReLU6)
        self.project = _conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        """project(depthwise(expand(x))) [+ x]."""
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


def _check_options(kind: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(KIND_OPTIONS[kind]))
    if unknown:
        accepted = ", ".join(repr(o) for o in KIND_OPTIONS[kind]) or "none"
        raise TypeError(f"option(s) {', '.join(repr(u) for u in unknown)} do not apply to kind={kind!r}; "
                        f"accepted options: {accepted}")


def compact_block(kind: str, cin: int, cout: int, stride: int = 1, **options: Any) -> nn.Module:
    """A block of ``kind`` (see KINDS) mapping ``cin -> cout`` channels with ``stride``; options per KIND_OPTIONS."""
    check_choice("kind", kind, KINDS)
    _check_options(kind, options)
    _check_block_args(cin, cout, stride)
    if kind == "dense":
        return conv_bn_relu(cin, cout, 3, stride=stride)
    if kind == "depthwise_separable":
        return DepthwiseSeparable(cin, cout, stride)
    if kind == "fire":
        return Fire(cin, cout, stride=stride, **options)
    if kind == "shuffle":
        return ShuffleBlock(cin, cout, stride=stride, **options)
    return InvertedResidual(cin, cout, stride=stride, **options)


class CompactResidual(nn.Module):
    """What replaces a ResNet BasicBlock: two compact blocks (cin -> cout with ``stride``, cout -> cout) in
    place of its two 3x3 convs, and the BasicBlock's shortcut (identity, or 1x1 conv-BN when the shape
    changes): relu(body(x) + shortcut(x))."""

    def __init__(self, kind: str, cin: int, cout: int, stride: int = 1, **options: Any) -> None:
        super().__init__()
        self.body = nn.Sequential(compact_block(kind, cin, cout, stride, **options),
                                  compact_block(kind, cout, cout, 1, **options))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = _conv_bn(cin, cout, 1, stride=stride)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """relu(body(x) + shortcut(x))."""
        return self.relu(self.body(x) + self.shortcut(x))


# ----------------------------------------------------------------------------------------------------------
# swapping the blocks of a backbone
# ----------------------------------------------------------------------------------------------------------
class Block(NamedTuple):
    """A backbone block :func:`swap_blocks` replaces: channels in and out, stride, and whether it is residual."""

    cin: int
    cout: int
    stride: int
    residual: bool


_COMPACT = (Fire, ShuffleBlock, InvertedResidual, CompactResidual)


def _is_conv_bn_relu(m: nn.Module) -> bool:
    """A dense k x k (k odd > 1, "same" padding, square stride) conv -> BatchNorm -> ReLU nn.Sequential."""
    if not (isinstance(m, nn.Sequential) and len(m) == 3):
        return False
    conv, bn, act = m
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.ReLU)):
        return False
    k = conv.kernel_size
    return (conv.groups == 1 and k[0] == k[1] and k[0] > 1 and k[0] % 2 == 1 and conv.padding == (k[0] // 2,) * 2
            and conv.dilation == (1, 1) and conv.stride[0] == conv.stride[1] and conv.padding_mode == "zeros")


def _block_of(m: nn.Module) -> Block | None:
    if _is_conv_bn_relu(m):
        return Block(m[0].in_channels, m[0].out_channels, m[0].stride[0], False)
    if isinstance(m, DepthwiseSeparable):
        return Block(m.depthwise[0].in_channels, m.pointwise[0].out_channels, m.depthwise[0].stride[0], False)
    if isinstance(m, BasicBlock):
        return Block(m.conv1.in_channels, m.conv2.out_channels, m.conv1.stride[0], True)
    return None


def _find_blocks(module: nn.Module, prefix: str) -> dict[str, Block]:
    found: dict[str, Block] = {}
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        block = _block_of(child)
        if block is not None:
            found[full] = block
        elif not isinstance(child, _COMPACT):
            found.update(_find_blocks(child, f"{full}."))
    return found


def replaceable_blocks(model: nn.Module) -> dict[str, Block]:
    """The blocks :func:`swap_blocks` replaces, by module name: every dense k x k conv-BN-ReLU, DepthwiseSeparable
    and BasicBlock of ``model.backbone`` (the whole model when it has none) except the first, the stem."""
    check_model(model)
    backbone = getattr(model, "backbone", None)
    root, prefix = (backbone, "backbone.") if isinstance(backbone, nn.Module) else (model, "")
    blocks = list(_find_blocks(root, prefix).items())
    return dict(blocks[1:])


def swap_blocks(model: nn.Module, kind: str, seed: int = 0, **options: Any) -> nn.Module:
    """A copy of ``model`` with every :func:`replaceable_blocks` block replaced by a fresh ``compact_block(kind, ...)``
    (a BasicBlock by a :class:`CompactResidual`), initialised from ``seed``; untrained, the rest kept as is."""
    check_model(model)
    check_choice("kind", kind, KINDS)
    _check_options(kind, options)
    check_seed(seed)
    blocks = replaceable_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no block to replace besides the stem: swap_blocks replaces dense "
                         "k x k conv-BN-ReLU blocks, DepthwiseSeparable and BasicBlock (archs vgg, resnet, mobilenet)")
    out = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, b in blocks.items():
            new = (CompactResidual(kind, b.cin, b.cout, b.stride, **options) if b.residual
                   else compact_block(kind, b.cin, b.cout, b.stride, **options))
            replace_module(out, name, new.train(out.training))
    return out


def replace_blocks(model: nn.Module, ctx: Context, kind: str, *, budget: int | None = None, seed: int | None = None,
                   **options: Any) -> nn.Module:
    """:func:`swap_blocks` (seed: ``ctx.seed`` by default), then train the whole model ``budget`` epochs
    (default ``ctx.budget``) through ``ctx`` with the learning rate cosine-annealed to 0, as the baselines are
    trained (at a constant rate the BatchNorm running statistics lag the moving weights); marked
    ``architecture`` with counted params and MACs (batch 1) before and after, and the per-epoch training loss."""
    check_model(model)
    check_ctx(ctx)
    budget = ctx.budget if budget is None else check_int("budget", budget, min_value=0)
    seed = ctx.seed if seed is None else check_seed(seed)
    out = swap_blocks(model, kind, seed, **options)
    replaced = list(replaceable_blocks(model))
    x = ctx.example_input(1)
    before, after = counted_totals(model, x), counted_totals(out, x)
    history = ctx.finetune(out, epochs=budget, callbacks=[CosineLR()])
    out.eval()
    return mark(out, f"compact_{kind}", "architecture", kind=kind, options=dict(options),
                replaced=replaced, params_before=before["params"], params_after=after["params"],
                macs_before=before["macs"], macs_after=after["macs"], finetune_epochs=budget,
                train_loss=list(history.train_loss))


# ----------------------------------------------------------------------------------------------------------
# transferred filters
# ----------------------------------------------------------------------------------------------------------
def _check_kernel(kernel: Any) -> int:
    kernel = check_int("kernel", kernel, min_value=1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel={kernel} must be odd (1, 3, 5, ...): the layer pads kernel // 2 on each side")
    return kernel


class EquivariantConv2d(nn.Module):
    """A lifting group convolution (Cohen & Welling 2016): ``cout_base`` learned k x k filters, each used in
    every transform of ``group``: "p4" (4 rotations by 90 degrees) or "p4m" (4 rotations x 2 flips).

    Output channel ``g * cout_base + i`` is learned filter i under transform g = 4·m + r: the filter
    flipped left-right when m = 1 (``torch.flip`` on the last dim), then rotated r quarter turns
    (``torch.rot90(w, r, dims=(-2, -1))``); the bias is shared by the |G| copies of a filter. With stride 1
    and an odd kernel (padding k // 2) the layer is exactly equivariant: rotating the input rotates the
    output and moves block r to block r + 1 (mod 4, within each m).

    Params: cout_base·cin·k² (+ cout_base), |G| times fewer than a plain conv of the same width; MACs are
    the plain conv's. The forward pass rebuilds the full kernel from the learned filters each call: the
    lesson is parameter sharing at equal width, not speed. ``to_conv()`` gives the equivalent nn.Conv2d."""

    def __init__(self, cin: int, cout_base: int, kernel: int = 3, group: str = "p4", stride: int = 1,
                 bias: bool = True) -> None:
        check_int("cin", cin, min_value=1)
        check_int("cout_base", cout_base, min_value=1)
        kernel = _check_kernel(kernel)
        check_choice("group", group, tuple(GROUPS))
        check_int("stride", stride, min_value=1)
        check_bool("bias", bias)
        super().__init__()
        base = nn.Conv2d(cin, cout_base, kernel, bias=bias)       # plain Conv2d initialisation
        self.weight = base.weight
        self.bias = base.bias
        self.group, self.stride, self.padding = group, stride, kernel // 2
        self.in_channels, self.out_channels = cin, cout_base * GROUPS[group]

    def expanded_weight(self) -> Tensor:
        """The (cout_base·|G|, cin, k, k) kernel: every learned filter under every transform, block by block."""
        flips = (self.weight, torch.flip(self.weight, dims=(-1,)))[: GROUPS[self.group] // 4]
        return torch.cat([torch.rot90(w, r, dims=(-2, -1)) for w in flips for r in range(4)])

    def expanded_bias(self) -> Tensor | None:
        """The bias of every output channel (each learned filter's bias repeated |G| times), or None."""
        return None if self.bias is None else self.bias.repeat(GROUPS[self.group])

    def forward(self, x: Tensor) -> Tensor:
        """conv2d of ``x`` with the expanded kernel."""
        return F.conv2d(x, self.expanded_weight(), self.expanded_bias(), stride=self.stride, padding=self.padding)

    def to_conv(self) -> nn.Conv2d:
        """An equivalent plain nn.Conv2d holding the expanded kernel (for ONNX export or the cost report)."""
        return _conv_with(self.expanded_weight(), self.expanded_bias(), self.stride, self.padding)


class CReLUConv2d(nn.Module):
    """Concatenated ReLU (Shang et al. 2016): a conv to ``cout // 2`` channels z, output cat(relu(z), relu(-z)).

    Equals relu of a conv to ``cout`` channels whose second half of filters (and biases) negates the first:
    half the params and half the MACs at the same width. Early conv layers learn such negated pairs by
    themselves, which is what the layer exploits. ``to_conv()`` gives that dense conv (apply ReLU after it)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, bias: bool = True) -> None:
        check_int("cin", cin, min_value=1)
        check_int("cout", cout, min_value=2)
        if cout % 2:
            raise ValueError(f"cout={cout} must be even: CReLU outputs a half and its negation")
        kernel = _check_kernel(kernel)
        check_int("stride", stride, min_value=1)
        check_bool("bias", bias)
        super().__init__()
        self.conv = nn.Conv2d(cin, cout // 2, kernel, stride=stride, padding=kernel // 2, bias=bias)
        self.in_channels, self.out_channels = cin, cout

    def forward(self, x: Tensor) -> Tensor:
        """cat(relu(z), relu(-z)) with z = conv(x)."""
        z = self.conv(x)
        return torch.cat([F.relu(z), F.relu(-z)], dim=1)

    def to_conv(self) -> nn.Conv2d:
        """The dense conv with filters [w; -w] (and biases [b; -b]); this layer is relu(to_conv()(x))."""
        c = self.conv
        bias = None if c.bias is None else torch.cat([c.bias, -c.bias])
        return _conv_with(torch.cat([c.weight, -c.weight]), bias, c.stride[0], c.padding[0])


def _conv_with(weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> nn.Conv2d:
    """A plain nn.Conv2d holding copies of ``weight`` and ``bias``."""
    cout, cin, k, _ = weight.shape
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


# ----------------------------------------------------------------------------------------------------------
# structural matrices
# ----------------------------------------------------------------------------------------------------------
class CirculantLinear(nn.Module):
    """A Linear whose weight is a circulant matrix (Cheng et al. 2015): C[i, j] = c[(i - j) mod n], n params.

    y = C x is the circular convolution c ⊛ x, computed as irfft(rfft(c) · rfft(x)) in O(n log n). With
    ``out_features`` != ``in_features`` the layer is the top-left out x in corner of the circulant of size
    n = max(in, out): x is zero-padded to n and y truncated to ``out_features``.

    Params: n (+ out bias) against in·out for a dense Linear. Counted MACs per call (``survey_lib.cost``'s FFT
    convention, L = ⌈log2 n⌉): n·L for rfft(c) (the weight's spectrum is recomputed every call; a deployment
    would store it), batch·n·L for rfft(x), 4·batch·(n // 2 + 1) for the complex product, batch·n·L for the
    irfft, against batch·in·out for a dense Linear. ``dense_matrix()`` gives the explicit matrix."""

    def __init__(self, in_features: int, out_features: int | None = None, bias: bool = True) -> None:
        check_int("in_features", in_features, min_value=1)
        out_features = in_features if out_features is None else check_int("out_features", out_features, min_value=1)
        check_bool("bias", bias)
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n = max(in_features, out_features)
        bound = 1 / math.sqrt(in_features)                      # nn.Linear's initialisation range
        self.c = nn.Parameter(torch.empty(self.n).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """C x (+ bias) over the last dim of ``x``, by FFT."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features in its last dim; "
                             f"the layer takes in_features={self.in_features}")
        y = torch.fft.irfft(torch.fft.rfft(self.c) * torch.fft.rfft(x, n=self.n), n=self.n)[..., : self.out_features]
        return y + self.bias if self.bias is not None else y

    def dense_matrix(self) -> Tensor:
        """The explicit (out_features, in_features) weight: the corner of the n x n circulant of ``c``."""
        i = torch.arange(self.n)
        return self.c[(i[:, None] - i[None, :]) % self.n][: self.out_features, : self.in_features]

    def to_linear(self) -> nn.Linear:
        """An equivalent dense nn.Linear."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.dense_matrix())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def equal_width_params(layer: nn.Module) -> tuple[int, int]:
    """(params of ``layer``, params of the plain Conv2d / Linear of the same in, out, kernel and bias)."""
    check_type("layer", layer, (EquivariantConv2d, CReLUConv2d, CirculantLinear),
               "an EquivariantConv2d, CReLUConv2d or CirculantLinear")
    own = sum(p.numel() for p in layer.parameters())
    plain = layer.to_linear() if isinstance(layer, CirculantLinear) else layer.to_conv()
    return own, sum(p.numel() for p in plain.parameters())
