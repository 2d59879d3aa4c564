"""Dynamic networks: stochastic depth (train shallower, run the whole net) and early exits (run less per input).

**Stochastic depth** (Huang et al. 2016). :class:`StochasticDepth` wraps a residual block
(``models.BasicBlock``: ``relu2(branch(x) + shortcut(x))`` with ``branch = bn2∘conv2∘relu1∘bn1∘conv1``). In
training, with probability ``1 - survival`` the residual branch is dropped and only ``relu2(shortcut(x))`` is
computed (the branch is not run at all). Conventions chosen here:

* ``mode="batch"`` (default, as in the paper): one coin per forward pass, the whole mini-batch drops or keeps
  the branch; ``mode="row"`` (torchvision's per-sample variant) draws one coin per example.
* Inverted scaling: a kept branch is multiplied by ``1 / survival`` during training, so the expected training
  output equals the plain block, and inference is the plain block *exactly* (``StochasticDepth.eval()(x)`` is
  ``block(x)``). The paper instead trains unscaled and multiplies by ``survival`` at test time; inverted
  scaling is the modern convention (torchvision, timm) and leaves nothing to change at deployment.

:func:`stochastic_depth` wraps every residual block of a copy with the paper's linear rule
``p_l = 1 - l / L * (1 - p_L)`` (l = 1..L in forward order, :func:`linear_survival`), fine-tunes it through
``ctx.finetune`` and returns it **unwrapped** (plain BasicBlocks): at inference the wrappers are the identity
anyway, and the plain model exports, counts and prunes like any other. It changes only the ``training``.

**Early exits** (BranchyNet, Teerapittayanon et al. 2016; MSDNet-style confidence rule). :func:`add_exits`
splits a classification ``TaskModel``'s backbone (an ``nn.Sequential``) after the named children
(:func:`stage_names`) and puts an exit head after each split: the task's own head, i.e. global average pool +
Linear. :class:`EarlyExitModel` then, in eval mode, gives each input the logits of the first exit whose max
softmax probability is ``>= threshold``; inputs still undecided go on (only they run the later segments, so
an input of a batch of 1 that leaves early never runs the rest). ``threshold > 1`` (e.g. ``float('inf')``)
sends every input to the final head and gives exactly the original model's output; exit indices are
``0..K-1`` for the K early exits and ``K`` for the final head. ``model.last_exits`` holds the exit each input
of the last eval forward took.

Training (``train=``): ``"exits"`` (default) freezes the backbone and the final head (parameters and BatchNorm
statistics) and trains only the exit heads, so the full model is unchanged and ``threshold > 1`` reproduces the
input model; ``"joint"`` trains everything. Either way ``fit`` minimizes
``task.loss(final) + exit_weight * sum_k task.loss(exit_k)`` (BranchyNet's weighted sum, equal weights),
through ``ctx.finetune(..., extra_loss=...)``.

Cost: :func:`exit_macs` gives counted MACs (batch 1, library's ``count``) of leaving at each exit:
``MACs(segments 0..k) + MACs(exit heads 0..k)`` -- the heads of earlier exits ran too and were rejected. The
last entry (the final head) is the full original model's MACs plus every early exit head's MACs.
:func:`evaluate_thresholds` runs every exit on every input once and applies the rule for each threshold
(the same decisions as ``forward``, up to floating-point differences from batch composition), giving accuracy,
the fraction of inputs per exit and the average counted MACs per input (``sum_k fraction_k * exit_macs[k]``).
The softmax/max of the rule is not counted (not a MAC, DESIGN.md section 4).

**Cascades** (big/little networks, Park et al. 2015): :func:`cascade` builds the same kind of model from two
separate classifiers, a small one as exit 0 on the raw input and a big one for the inputs it is unsure about,
so every function above applies to it. :func:`per_input_latency` measures each input's eager latency at batch
1 against the plain network, which shows what the average counted MACs hide: inputs that go on pay for every
exit they passed.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from .._validate import check_choice, check_float, check_int, check_type
from ..models import BasicBlock
from ..tasks import Task
from .base import Context, check_ctx, mark, replace_module

__all__ = [
    "MODES", "TRAIN_MODES", "check_survival", "check_threshold", "linear_survival", "StochasticDepth",
    "wrap_residual_blocks", "unwrap", "stochastic_depth", "stage_names", "EarlyExitModel", "ExitLoss",
    "add_exits", "exit_macs", "exit_confidences", "exits_for_threshold", "evaluate_thresholds",
    "cascade", "per_input_latency",
]

MODES = ("batch", "row")            # stochastic depth: one coin per batch (paper) or per example (torchvision "row")
TRAIN_MODES = ("exits", "joint")    # early exits: train only the exit heads, or everything
DEFAULT_FINAL_SURVIVAL = 0.5        # the paper's p_L
DEFAULT_THRESHOLD = 0.9


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------
def check_survival(value: Any, param: str = "survival") -> float:
    """``value`` as a float in (0, 1]; TypeError/ValueError naming ``param`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{param} must be a number in (0, 1], got {type(value).__name__} ({value!r})")
    v = float(value)
    if not 0.0 < v <= 1.0:  # NaN fails too
        raise ValueError(f"{param}={value!r} is out of range; accepted: 0 < {param} <= 1 "
                         "(the probability that a residual branch is kept in training)")
    return v


def check_threshold(value: Any, param: str = "threshold") -> float:
    """``value`` as a float > 0 (``inf`` allowed: never exit early); TypeError/ValueError naming ``param``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{param} must be a number > 0, got {type(value).__name__} ({value!r})")
    v = float(value)
    if math.isnan(v) or v <= 0.0:
        raise ValueError(f"{param}={value!r} is out of range; accepted: {param} > 0 (a max softmax probability; "
                         "values above 1, e.g. float('inf'), run every input to the final head)")
    return v


def _check_block(block: Any) -> BasicBlock:
    return check_type("block", block, BasicBlock, "a survey_lib.models.BasicBlock (a residual block)")


# ----------------------------------------------------------------------------------------------------------
# Stochastic depth
# ----------------------------------------------------------------------------------------------------------
def linear_survival(n_blocks: int, final_survival: float = DEFAULT_FINAL_SURVIVAL) -> list[float]:
    """The paper's linear decay: ``p_l = 1 - l / L * (1 - p_L)`` for l = 1..L (the last block keeps p_L)."""
    n_blocks = check_int("n_blocks", n_blocks, min_value=1)
    p_last = check_survival(final_survival, "final_survival")
    return [1.0 - (l / n_blocks) * (1.0 - p_last) for l in range(1, int(n_blocks) + 1)]


class StochasticDepth(nn.Module):
    """A residual ``block`` whose branch is dropped in training with probability ``1 - survival``.

    Training: kept -> ``relu2(branch(x) / survival + shortcut(x))``; dropped -> ``relu2(shortcut(x))``
    (``mode="batch"``: one draw per forward; ``"row"``: one per example). Eval: exactly ``block(x)``.
    Draws use torch's global generator (seed it for reproducibility)."""

    def __init__(self, block: BasicBlock, survival: float, mode: str = "batch") -> None:
        _check_block(block)
        survival = check_survival(survival)
        check_choice("mode", mode, MODES)
        super().__init__()
        self.block = block
        self.survival = survival
        self.mode = mode

    def extra_repr(self) -> str:
        return f"survival={self.survival:.4g}, mode={self.mode!r}"

    @staticmethod
    def branch(block: BasicBlock, x: Tensor) -> Tensor:
        """The residual branch ``bn2(conv2(relu1(bn1(conv1(x)))))`` of a BasicBlock."""
        return block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        """``block(x)`` in eval mode; the stochastic residual in training (class docstring)."""
        b = self.block
        if not self.training or self.survival == 1.0:
            return b(x)
        shortcut = b.shortcut(x)
        if self.mode == "batch":
            if float(torch.rand(())) >= self.survival:
                return b.relu2(shortcut)
            return b.relu2(self.branch(b, x) / self.survival + shortcut)
        keep = (torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < self.survival).to(x.dtype)
        if not bool(keep.any()):
            return b.relu2(shortcut)
        return b.relu2(self.branch(b, x) * (keep / self.survival) + shortcut)


def _residual_blocks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BasicBlock)]


def wrap_residual_blocks(
    model: nn.Module, final_survival: float = DEFAULT_FINAL_SURVIVAL, mode: str = "batch"
) -> list[str]:
    """Wrap every BasicBlock of ``model`` IN PLACE in :class:`StochasticDepth` with :func:`linear_survival`
    rates (forward order); returns the wrapped names. ValueError if ``model`` has no residual block."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    check_choice("mode", mode, MODES)
    names = _residual_blocks(model)
    if not names:
        config = getattr(model, "config", None)
        arch = config.get("arch", type(model).__name__) if isinstance(config, dict) else type(model).__name__
        raise ValueError(f"stochastic depth needs residual blocks (survey_lib.models.BasicBlock, arch 'resnet'); "
                         f"model (arch {arch!r}) has none")
    for name, p in zip(names, linear_survival(len(names), final_survival)):
        replace_module(model, name, StochasticDepth(model.get_submodule(name), p, mode))
    return names


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every :class:`StochasticDepth` wrapper of ``model`` IN PLACE by its block; return ``model``."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    for name in [n for n, m in model.named_modules() if isinstance(m, StochasticDepth)]:
        replace_module(model, name, model.get_submodule(name).block)
    return model


def stochastic_depth(
    model: nn.Module,
    ctx: Context,
    *,
    final_survival: float = DEFAULT_FINAL_SURVIVAL,
    mode: str = "batch",
    epochs: int | None = None,
    lr: float | None = None,
) -> nn.Module:
    """A copy of ``model`` fine-tuned for ``epochs`` (default ``ctx.budget``) with stochastic depth on every
    residual block (linear decay to ``final_survival``), returned unwrapped in eval mode; ``model`` is unchanged.
    ValueError for a model without residual blocks (e.g. arch 'vgg')."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    check_ctx(ctx)
    check_survival(final_survival, "final_survival")
    check_choice("mode", mode, MODES)
    out = copy.deepcopy(model)
    names = wrap_residual_blocks(out, final_survival, mode)
    survivals = [out.get_submodule(n).survival for n in names]
    try:
        history = ctx.finetune(out, epochs=epochs, lr=lr)
    finally:
        unwrap(out)
    out.eval()
    final = history.train_loss[-1] if history.train_loss else float("nan")
    return mark(out, "stochastic_depth", "training", final_survival=float(final_survival), mode=mode,
                blocks=names, survival=survivals, expected_blocks=float(sum(survivals)),
                epochs=len(history.train_loss), train_loss=final if math.isfinite(final) else None)


# ----------------------------------------------------------------------------------------------------------
# Early exits
# ----------------------------------------------------------------------------------------------------------
def stage_names(model: nn.Module) -> list[str]:
    """Names accepted by ``add_exits(after=...)``: the backbone's top-level children, except the last one."""
    backbone = _backbone(model)
    return [n for n, _ in backbone.named_children()][:-1]


def _backbone(model: Any) -> nn.Sequential:
    check_type("model", model, nn.Module, "a torch.nn.Module")
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if not isinstance(backbone, nn.Sequential) or not isinstance(head, nn.Module):
        raise TypeError("model must be a survey_lib.models.TaskModel (an nn.Sequential .backbone and a .head), "
                        f"got {type(model).__name__}")
    return backbone


class EarlyExitModel(nn.Module):
    """``segments[0] -> exits[0] -> segments[1] -> exits[1] ... -> segments[K] -> final_head``.

    Eval: per input, the logits of the first exit with max softmax probability ``>= threshold`` (later segments
    run only on the inputs still undecided); ``last_exits`` holds each input's exit (K = the final head).
    Training: returns the final logits and keeps every early exit's logits in ``exit_logits`` for the loss."""

    def __init__(
        self,
        backbone_stages: Sequence[nn.Module],
        exits: Sequence[nn.Module],
        final_head: nn.Module,
        threshold: float = DEFAULT_THRESHOLD,
        exit_names: Sequence[str] | None = None,
    ) -> None:
        stages, heads = list(backbone_stages), list(exits)
        for i, m in enumerate(stages):
            check_type(f"backbone_stages[{i}]", m, nn.Module, "a torch.nn.Module")
        for i, m in enumerate(heads):
            check_type(f"exits[{i}]", m, nn.Module, "a torch.nn.Module")
        check_type("final_head", final_head, nn.Module, "a torch.nn.Module")
        if len(stages) != len(heads) + 1:
            raise ValueError(f"backbone_stages must hold one more module than exits (the last runs to final_head), "
                             f"got {len(stages)} stages and {len(heads)} exits")
        names = [str(i) for i in range(len(heads))] if exit_names is None else [str(n) for n in exit_names]
        if len(names) != len(heads):
            raise ValueError(f"exit_names must name each of the {len(heads)} exits, got {len(names)} names")
        super().__init__()
        self.segments = nn.ModuleList(stages)
        self.exits = nn.ModuleList(heads)
        self.final_head = final_head
        self.threshold = check_threshold(threshold)
        self.exit_names = names + ["final"]
        self.frozen_backbone = False
        self.exit_logits: list[Tensor] = []
        self.last_exits: Tensor | None = None

    @property
    def num_exits(self) -> int:
        """Early exits plus the final head."""
        return len(self.exits) + 1

    def train(self, mode: bool = True) -> "EarlyExitModel":
        """As nn.Module.train, but a frozen backbone and final head stay in eval mode (BatchNorm statistics kept)."""
        super().train(mode)
        if self.frozen_backbone:
            self.segments.eval()
            self.final_head.eval()
        return self

    def freeze_backbone(self, frozen: bool = True) -> "EarlyExitModel":
        """Stop (or restart) training the segments and the final head: no gradients, BatchNorm in eval mode."""
        self.frozen_backbone = bool(frozen)
        for p in list(self.segments.parameters()) + list(self.final_head.parameters()):
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit and of the final head, on every input (no early stopping)."""
        outs = []
        for segment, head in zip(self.segments, self.exits):
            x = segment(x)
            outs.append(head(x))
        outs.append(self.final_head(self.segments[-1](x)))
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """Training: final logits (early exits' logits kept in ``exit_logits``). Eval: early-exit inference."""
        if self.training:
            outs = self.forward_all(x)
            self.exit_logits = outs[:-1]
            return outs[-1]
        return self._infer(x, self.threshold)

    def _infer(self, x: Tensor, threshold: float) -> Tensor:
        n = x.shape[0]
        out: Tensor | None = None
        taken = torch.full((n,), len(self.exits), dtype=torch.long, device=x.device)
        alive = torch.arange(n, device=x.device)
        for k, (segment, head) in enumerate(zip(self.segments, self.exits)):
            x = segment(x)
            logits = head(x)
            if out is None:
                out = logits.new_empty((n,) + tuple(logits.shape[1:]))
            done = torch.softmax(logits, dim=1).amax(dim=1) >= threshold
            if bool(done.any()):
                out[alive[done]] = logits[done]
                taken[alive[done]] = k
                keep = ~done
                if not bool(keep.any()):
                    self.last_exits = taken.cpu()
                    return out
                x, alive = x[keep], alive[keep]
        logits = self.final_head(self.segments[-1](x))
        if out is None or len(alive) == n:
            out = logits
        else:
            out[alive] = logits
        self.last_exits = taken.cpu()
        return out


class ExitLoss:
    """``fit``'s extra loss: ``exit_weight * sum_k task.loss(exit_k logits, y)`` over the early exits of an
    :class:`EarlyExitModel` (``fit`` itself adds ``task.loss`` of the final head)."""

    def __init__(self, task: Task, exit_weight: float = 1.0) -> None:
        self.task = check_type("task", task, Task, "a survey_lib.tasks.Task")
        self.exit_weight = check_float("exit_weight", exit_weight, min_value=0.0)

    def __call__(self, model: nn.Module, x: Tensor, output: Tensor, target: Tensor) -> Tensor:
        logits = getattr(model, "exit_logits", [])
        if not logits:
            return output.new_zeros(())
        return self.exit_weight * sum(self.task.loss(z, target) for z in logits)


def _check_classification(task: Any) -> Task:
    check_type("ctx", task, (Context, Task), "a survey_lib.methods.Context or a survey_lib.tasks.Task")
    task = task.task if isinstance(task, Context) else task
    if task.name != "classification":
        raise ValueError(f"task={task.name!r} is not supported by early exits (confidence = max softmax "
                         "probability); accepted values: 'classification'")
    return task


def _check_after(after: Any, names: list[str]) -> list[str]:
    if isinstance(after, (str, numbers.Integral)):
        after = [after]
    if not isinstance(after, Iterable):
        raise TypeError(f"after must be a list of stage names (accepted: {names}), got {type(after).__name__}")
    chosen = [str(a) for a in after]
    if not chosen:
        raise ValueError(f"after is empty: name at least one stage; accepted values: {names}")
    for a in chosen:
        check_choice("after", a, names)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"after={chosen} names a stage twice; accepted values: {names}, each once")
    return sorted(chosen, key=names.index)


def _example_input(model: nn.Module, ctx: Any, example_input: Tensor | None) -> Tensor:
    if example_input is not None:
        return check_type("example_input", example_input, Tensor, "a torch.Tensor (B, C, H, W)")[:1]
    if isinstance(ctx, Context):
        return ctx.example_input(1)
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "in_channels" in config and "image_size" in config:
        return torch.zeros(1, config["in_channels"], config["image_size"], config["image_size"])
    raise ValueError("example_input is needed to size the exit heads (the model has no in_channels/image_size config)")


def add_exits(
    model: nn.Module,
    ctx: Context | Task,
    *,
    after: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    train: str = "exits",
    exit_weight: float = 1.0,
    epochs: int | None = None,
    lr: float | None = None,
    example_input: Tensor | None = None,
) -> EarlyExitModel:
    """A copy of the classification ``model`` with an exit head (global pool + Linear) after each backbone stage
    in ``after`` (see :func:`stage_names`), as an :class:`EarlyExitModel` in eval mode; ``model`` is unchanged.

    With a Context the exits are trained for ``epochs`` (default ``ctx.budget``): ``train="exits"`` trains the
    exit heads only (backbone and final head frozen, so the full model is kept exactly); ``"joint"`` trains all,
    on ``task.loss(final) + exit_weight * sum_k task.loss(exit_k)``. With a Task the heads stay untrained.
    The exit heads are initialised from ``ctx.seed`` (0 for a Task)."""
    task = _check_classification(ctx)
    backbone = _backbone(model)
    threshold = check_threshold(threshold)
    check_choice("train", train, TRAIN_MODES)
    check_float("exit_weight", exit_weight, min_value=0.0)
    chosen = _check_after(after, stage_names(model))
    x = _example_input(model, ctx, example_input)
    src = copy.deepcopy(model).eval()
    children = list(src.backbone.named_children())
    segments, heads, current = [], [], []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed if isinstance(ctx, Context) else 0)
        for name, child in children:
            current.append(child)
            x = child(x)
            if name in chosen:
                if x.dim() != 4:
                    raise ValueError(f"after={name!r}: that stage outputs shape {tuple(x.shape)}, not a (B, C, H, W) "
                                     f"feature map; accepted values: stages with feature maps among {stage_names(model)}")
                segments.append(nn.Sequential(*current))
                heads.append(task.head(x.shape[1]))
                current = []
    segments.append(nn.Sequential(*current))
    out = EarlyExitModel(segments, heads, src.head, threshold, exit_names=chosen)
    out.config = dict(getattr(model, "config", {}) or {})
    for attr in ("compression", "compression_history"):
        if hasattr(model, attr):
            setattr(out, attr, copy.deepcopy(getattr(model, attr)))
    out.freeze_backbone(train == "exits")
    epochs_run, final = 0, float("nan")
    if isinstance(ctx, Context):
        history = ctx.finetune(out, epochs=epochs, extra_loss=ExitLoss(task, exit_weight), lr=lr)
        epochs_run = len(history.train_loss)
        final = history.train_loss[-1] if history.train_loss else float("nan")
    out.freeze_backbone(False)
    out.exit_logits = []
    out.eval()
    return mark(out, "early_exit", "architecture", after=chosen, threshold=threshold, train=train,
                exit_weight=float(exit_weight), epochs=epochs_run, train_loss=final if math.isfinite(final) else None,
                exit_params=sum(p.numel() for p in out.exits.parameters()))


def cascade(
    small: nn.Module,
    big: nn.Module,
    ctx: Context | Task,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    example_input: Tensor | None = None,
) -> EarlyExitModel:
    """A big/little cascade (Park et al. 2015) as an :class:`EarlyExitModel`: copies of ``small`` (any
    classifier of the same classes) as exit 0 on the raw input, and of ``big`` (a TaskModel) as the rest,
    run only on inputs where ``small``'s max softmax probability is below ``threshold``. Counted MACs of the
    final exit are big's plus small's (small ran and was rejected); ``threshold > 1`` gives big's output."""
    task = _check_classification(ctx)
    check_type("small", small, nn.Module, "a trained classifier (torch.nn.Module)")
    _backbone(big)
    threshold = check_threshold(threshold)
    x = _example_input(big, ctx, example_input)
    small_c, big_c = copy.deepcopy(small).eval(), copy.deepcopy(big).eval()
    with torch.no_grad():
        s_out, b_out = small_c(x), big_c(x)
    if s_out.shape != b_out.shape:
        raise ValueError(f"small outputs shape {tuple(s_out.shape)} but big {tuple(b_out.shape)}: a cascade needs two "
                         f"classifiers of the same {task.name} task and classes")
    out = EarlyExitModel([nn.Identity(), big_c.backbone], [small_c], big_c.head, threshold, exit_names=["small"])
    out.config = dict(getattr(big, "config", {}) or {})
    out.eval()
    return mark(out, "early_exit", "architecture", after=["input"], threshold=threshold, train="none", exit_weight=0.0,
                epochs=0, train_loss=None, exit_params=sum(p.numel() for p in small_c.parameters()))


def _check_exit_model(model: Any) -> EarlyExitModel:
    return check_type("model", model, EarlyExitModel, "an EarlyExitModel (see add_exits)")


def exit_macs(model: EarlyExitModel, x: Tensor) -> list[int]:
    """Counted MACs (batch 1, ``cost.count``) of an input leaving at each exit: segments 0..k plus exit heads
    0..k; the last entry (final head) = the full model's MACs + all early exit heads' MACs."""
    from ..cost import count
    from ..cost.counting import eval_mode

    _check_exit_model(model)
    check_type("x", x, Tensor, "a torch.Tensor (B, C, H, W)")
    x = x[:1]
    total, result = 0, []
    with torch.no_grad(), eval_mode(model):          # BatchNorm statistics untouched, training flags restored
        for segment, head in zip(model.segments, model.exits):
            total += int(count(segment, x)["macs"].sum())
            x = segment(x)
            total += int(count(head, x)["macs"].sum())
            result.append(total)
        last = model.segments[-1]
        total += int(count(last, x)["macs"].sum())
        total += int(count(model.final_head, last(x))["macs"].sum())
    result.append(total)
    return result


def full_macs(model: EarlyExitModel, x: Tensor) -> int:
    """Counted MACs (batch 1) of the model without its early exits: all segments and the final head."""
    from ..cost import count

    _check_exit_model(model)
    plain = nn.Sequential(*model.segments, model.final_head)
    return int(count(plain, check_type("x", x, Tensor, "a torch.Tensor")[:1])["macs"].sum())


def exit_confidences(model: EarlyExitModel, x: Tensor) -> tuple[Tensor, Tensor]:
    """(confidence (B, K+1), prediction (B, K+1)) of every exit on every input: max softmax probability and argmax."""
    _check_exit_model(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = [torch.softmax(z, dim=1) for z in model.forward_all(x)]
    finally:
        model.train(was)
    conf, pred = zip(*(p.max(dim=1) for p in probs))
    return torch.stack(conf, dim=1), torch.stack(pred, dim=1)


def exits_for_threshold(confidence: Tensor, threshold: float) -> Tensor:
    """(B,) index of the first exit with ``confidence >= threshold``; the last column (final head) otherwise."""
    threshold = check_threshold(threshold)
    hit = confidence[:, :-1] >= threshold
    last = confidence.shape[1] - 1
    first = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), torch.full_like(hit[:, 0], last, dtype=torch.long))
    return first.long()


def evaluate_thresholds(
    model: EarlyExitModel,
    data: Any,
    thresholds: Iterable[float],
    *,
    split: str = "test",
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """For each threshold: ``threshold``, ``accuracy``, ``exit_fractions`` (per exit, final last; sum 1),
    ``avg_macs`` (counted, per input), ``exit_macs``, ``full_macs`` (model without exits) and ``macs_ratio``
    (avg_macs / full_macs). ``data`` is a Context (its ``split``) or a dataset of (input, label) pairs."""
    from ..data import loader
    from ..train import check_data

    _check_exit_model(model)
    dataset = data
    if isinstance(data, Context):
        dataset = getattr(data.data, check_choice("split", split, ("train", "val", "test")))
    check_data(dataset, "data")
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Iterable):
        raise TypeError(f"thresholds must be a list of numbers > 0, got {type(thresholds).__name__}")
    thresholds = [check_threshold(t, "thresholds[i]") for t in thresholds]
    confs, preds, labels = [], [], []
    for x, y in loader(dataset, batch_size, shuffle=False):
        c, p = exit_confidences(model, x)
        confs.append(c), preds.append(p), labels.append(y)
    conf, pred, y = torch.cat(confs), torch.cat(preds), torch.cat(labels)
    x1 = dataset[0][0].unsqueeze(0)
    macs = exit_macs(model, x1)
    full = full_macs(model, x1)
    rows = []
    for t in thresholds:
        taken = exits_for_threshold(conf, t)
        chosen = pred.gather(1, taken[:, None]).squeeze(1)
        counts = torch.bincount(taken, minlength=model.num_exits).double()
        fractions = (counts / len(taken)).tolist()
        avg = float(sum(f * m for f, m in zip(fractions, macs)))
        rows.append({"threshold": t, "accuracy": float((chosen == y).double().mean()), "exit_fractions": fractions,
                     "exit_names": list(model.exit_names), "avg_macs": avg, "exit_macs": list(macs),
                     "full_macs": full, "macs_ratio": avg / full if full else float("nan"), "kind": "counted"})
    return rows


def _run_to_end(model: EarlyExitModel, x: Tensor) -> Tensor:
    """The original network inside ``model``: every segment, then the final head, no exit heads."""
    for segment in model.segments:
        x = segment(x)
    return model.final_head(x)


def per_input_latency(
    model: EarlyExitModel,
    inputs: Tensor,
    *,
    threshold: float | None = None,
    runs: int = 5,
    warmup: int = 2,
    threads: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Measured eager latency of each input at batch 1: per input, ``exit`` (index taken at ``threshold``,
    default the model's), ``early_ms`` (early-exit inference) and ``full_ms`` (the original network run to the
    end, no exit heads), each the median of ``runs`` timed calls after ``warmup``, the two taking turns in a
    seeded order so that a burst of load hits both; ``kind`` is "measured"."""
    import random
    import statistics
    import time

    from ..cost.latency import torch_threads

    _check_exit_model(model)
    check_type("inputs", inputs, Tensor, "a (N, C, H, W) tensor of inputs")
    if inputs.dim() < 2 or len(inputs) == 0:
        raise ValueError(f"inputs must hold at least one example along dim 0, got shape {tuple(inputs.shape)}")
    t = model.threshold if threshold is None else check_threshold(threshold)
    check_int("runs", runs, min_value=1)
    check_int("warmup", warmup, min_value=0)
    rng = random.Random(check_int("seed", seed, min_value=0))
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad(), torch_threads(threads):
            for i in range(len(inputs)):
                x = inputs[i:i + 1]
                calls = {"early_ms": lambda: model._infer(x, t), "full_ms": lambda: _run_to_end(model, x)}
                samples: dict[str, list[float]] = {k: [] for k in calls}
                for r in range(warmup + runs):
                    for name in rng.sample(list(calls), len(calls)):
                        start = time.perf_counter_ns()
                        calls[name]()
                        if r >= warmup:
                            samples[name].append((time.perf_counter_ns() - start) / 1e6)
                model._infer(x, t)
                rows.append({"index": i, "exit": int(model.last_exits[0]), **{k: statistics.median(v) for k, v in samples.items()},
                             "kind": "measured"})
    finally:
        model.train(was_training)
    return rows
