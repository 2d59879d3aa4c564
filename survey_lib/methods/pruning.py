"""Unstructured pruning with masks, gradual (AGP) and iterative schedules, OBD saliency, group lasso.

Masks are plain data (shrinkbench style): a ``dict[str, Tensor]`` of bool tensors keyed by parameter name
("backbone.0.0.weight"); ``True`` keeps a weight. A method is a short composition of small pure functions::

    weights = prunable_weights(model, exclude)          # Conv2d / Linear weights by name
    masks = global_masks(magnitude_scores(weights), 0.9)  # or layerwise_masks, random_scores, obd_scores
    apply_masks(model, masks)                           # zero the pruned weights (in place, on a copy)
    ctx.finetune(model, callbacks=[MaskCallback(masks)])  # masks stay enforced while fine-tuning

Every method deep-copies its input and marks the result with ``changes="mask"``: the zeros are simulated
savings; the tensors keep their dense shape and a dense kernel still multiplies by every zero.
``sparsity`` is the fraction of zero weights among the pruned tensors; exactly ``round(sparsity * n)`` of
them are pruned (per layer for ``scope="layer"``, over all of them for ``scope="global"``).

Methods (papers):

* :func:`magnitude_prune` -- one-shot magnitude pruning + fine-tuning (Han et al., NeurIPS 2015);
  :func:`random_prune` is the control.
* :func:`agp_prune` -- gradual pruning on the polynomial schedule of Zhu & Gupta (2017), :class:`AGPCallback`.
* :func:`iterative_prune` -- prune / retrain iterations at increasing sparsity (Han et al. 2015).
* :func:`obd_prune` -- Optimal Brain Damage saliency 0.5 * H_ii * w_i**2 (LeCun et al., NeurIPS 1990) with an
  empirical-Fisher estimate of the Hessian diagonal (:func:`fisher_diagonal`).
* :func:`group_lasso_train` -- structured sparsity by a group-lasso penalty over filters or channels
  (Wen et al., NeurIPS 2016); groups driven to ~0 are then zeroed with a mask (physical removal lives in
  ``survey_lib.methods.structured``).
* :func:`layer_sensitivity` -- prune one layer at a time without fine-tuning (Li et al. 2017, Fig. 2).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from .._validate import (
    check_bool, check_choice, check_finite, check_float, check_fraction, check_int, check_mapping, check_model,
    check_tensor, run_forward,
)
from ..train import Callback, TrainState
from .base import Context, check_ctx, mark

Masks = dict[str, Tensor]
Scores = dict[str, Tensor]
ScoreFn = Callable[[dict[str, Tensor]], Scores]
MasksFn = Callable[[nn.Module, float], Masks]

SCOPES = ("layer", "global")
GROUPS = ("filters", "channels")
EXCLUDE_KEYWORDS = ("first", "last")
PRUNABLE = (nn.Conv2d, nn.Linear)


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------
def check_sparsity(sparsity: object, param: str = "sparsity") -> float:
    """Return ``sparsity`` as a float in [0, 1); TypeError for a non-number, ValueError otherwise."""
    return check_fraction(param, sparsity, meaning=" (the fraction of zero weights, 0.9 = 90% zeros)")


def check_finetune_ctx(method: str, ctx: object, finetune: object) -> Context | None:
    """``ctx`` of a method that fine-tunes when ``finetune``: a Context, or None with ``finetune=False``."""
    check_bool("finetune", finetune)
    check_ctx(ctx, optional=True)
    if finetune and ctx is None:
        raise ValueError(f"{method}: finetune=True needs a Context (ctx); pass finetune=False to skip it")
    return ctx


def _check_tensors(param: str, tensors: object, *, finite: bool = False) -> Mapping[str, Tensor]:
    """A {name: tensor} mapping (finite when asked); TypeError/ValueError naming ``param`` otherwise."""
    check_mapping(param, tensors, "a {parameter name: tensor} dict")
    for name, t in tensors.items():
        check_tensor(f"{param}[{name!r}]", t)
        if finite:
            check_finite(f"{param}[{name!r}]", t)
    return tensors


def _check_masks(masks: object) -> Mapping[str, Tensor]:
    """A {parameter name: bool tensor} mapping; TypeError naming ``masks`` otherwise."""
    _check_tensors("masks", masks)
    for name, m in masks.items():
        if m.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor (True keeps a weight), got {m.dtype}")
    return masks


def _check_exclude(exclude: str | Iterable[str]) -> tuple[str, ...]:
    if not isinstance(exclude, (str, Iterable)):
        raise TypeError(f"exclude must be 'first', 'last', a parameter name or a sequence of them, "
                        f"got {type(exclude).__name__}")
    items = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"exclude must hold 'first', 'last' or parameter names, got {item!r}")
    return items


# ----------------------------------------------------------------------------------------------------------
# Masks as plain data: small pure functions
# ----------------------------------------------------------------------------------------------------------
def prunable_weights(model: nn.Module, exclude: str | Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """The weights of every Conv2d and Linear layer by parameter name, in module (= forward) order.

    ``exclude`` may hold ``"first"`` (the first such layer, usually the stem conv), ``"last"`` (the last one:
    the classifier / regression Linear or the final 1x1 conv of a dense head) and exact parameter names.
    """
    check_model(model)
    exclude = _check_exclude(exclude)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, PRUNABLE):
            raise ValueError(f"cannot prune {name or 'model'}: {type(module).__name__} layers are not supported; "
                             "accepted layer types: Conv2d, Linear")
    weights = {f"{name}.weight" if name else "weight": module.weight
               for name, module in model.named_modules() if isinstance(module, PRUNABLE)}
    names = list(weights)
    unknown = [e for e in exclude if e not in EXCLUDE_KEYWORDS and e not in weights]
    if unknown:
        raise ValueError(f"exclude={unknown!r} names no Conv2d/Linear weight; accepted: 'first', 'last' "
                         f"or one of {names}")
    drop = {e for e in exclude if e in weights}
    if names and "first" in exclude:
        drop.add(names[0])
    if names and "last" in exclude:
        drop.add(names[-1])
    return {name: w for name, w in weights.items() if name not in drop}


def _weights_to_prune(model: nn.Module, exclude: str | Iterable[str], what: str = "prune") -> dict[str, nn.Parameter]:
    """:func:`prunable_weights`, with a ValueError when there are none (pruning would silently do nothing)."""
    weights = prunable_weights(model, exclude)
    if not weights:
        raise ValueError(f"nothing to {what}: the model has no Conv2d/Linear weight left after exclude={exclude!r}")
    return weights


def magnitude_scores(weights: Mapping[str, Tensor]) -> Scores:
    """|w|: the smallest weights are pruned first (Han et al. 2015)."""
    _check_tensors("weights", weights)
    return {name: w.detach().abs().clone() for name, w in weights.items()}


def random_scores(weights: Mapping[str, Tensor], seed: int = 0) -> Scores:
    """Uniform random scores: random pruning, the control every criterion should beat."""
    _check_tensors("weights", weights)
    check_int("seed", seed, min_value=0)
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(w.shape, generator=gen) for name, w in weights.items()}


def _n_pruned(sparsity: float, n: int) -> int:
    return min(n, int(math.floor(sparsity * n + 0.5)))


def _lowest(flat: Tensor, k: int) -> Tensor:
    """Bool tensor, True at the ``k`` smallest entries (ties broken by position, so the count is exact)."""
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep


def layerwise_masks(scores: Mapping[str, Tensor], sparsity: float | Mapping[str, float]) -> Masks:
    """Prune ``round(sparsity * n)`` lowest-score weights in every layer (``sparsity`` may be per layer)."""
    _check_scores(scores)
    if isinstance(sparsity, Mapping) and set(scores) - set(sparsity):
        raise ValueError(f"sparsity has no entry for {sorted(set(scores) - set(sparsity))}; a per-layer sparsity "
                         "dict must name every scored weight")
    masks = {}
    for name, s in scores.items():
        target = sparsity[name] if isinstance(sparsity, Mapping) else sparsity
        target = check_sparsity(target, f"sparsity[{name!r}]" if isinstance(sparsity, Mapping) else "sparsity")
        masks[name] = _lowest(s.detach().flatten().float(), _n_pruned(target, s.numel())).reshape(s.shape)
    return masks


def global_masks(scores: Mapping[str, Tensor], sparsity: float) -> Masks:
    """Prune the ``round(sparsity * N)`` lowest scores over all layers together (N = all scored weights)."""
    sparsity = check_sparsity(sparsity)
    _check_scores(scores)
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    keep = _lowest(flat, _n_pruned(sparsity, flat.numel()))
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return masks


def _check_scores(scores: object) -> None:
    _check_tensors("scores", scores, finite=True)
    if not scores:
        raise ValueError("scores is empty: nothing to prune (no Conv2d/Linear weight was scored)")


def scope_masks(scores: Mapping[str, Tensor], sparsity: float, scope: str = "global") -> Masks:
    """:func:`layerwise_masks` for ``scope="layer"``, :func:`global_masks` for ``scope="global"``."""
    check_choice("scope", scope, SCOPES)
    return layerwise_masks(scores, sparsity) if scope == "layer" else global_masks(scores, sparsity)


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Multiply each masked parameter of ``model`` by its mask IN PLACE; return ``model``."""
    _check_masks(masks)
    params = dict(check_model(model).named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in params:
                raise ValueError(f"mask {name!r} names no parameter of the model")
            if params[name].shape != mask.shape:
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the parameter "
                                 f"{tuple(params[name].shape)}")
            params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return model


def mask_sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of pruned (False) entries over all masks."""
    _check_masks(masks)
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        raise ValueError("masks is empty: there is no weight whose sparsity could be measured")
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


def masks_from_zeros(model: nn.Module, exclude: str | Iterable[str] = ()) -> Masks:
    """The masks a pruned model carries implicitly: True where a prunable weight is non-zero."""
    return {name: w.detach() != 0 for name, w in prunable_weights(model, exclude).items()}


def weight_sparsity(model: nn.Module, exclude: str | Iterable[str] = ()) -> float:
    """Fraction of exact zeros among the model's Conv2d/Linear weights (all of them by default)."""
    _weights_to_prune(model, exclude, "measure")
    return mask_sparsity(masks_from_zeros(model, exclude))


def sparsity_table(model: nn.Module) -> pd.DataFrame:
    """Per Conv2d/Linear weight: ``layer``, ``params``, ``zeros``, ``sparsity``."""
    rows = [{"layer": name, "params": w.numel(), "zeros": int((w == 0).sum()),
             "sparsity": float((w == 0).float().mean())} for name, w in prunable_weights(model).items()]
    return pd.DataFrame(rows, columns=["layer", "params", "zeros", "sparsity"])


def make_masks(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    exclude: str | Iterable[str] = (),
    scores: ScoreFn = magnitude_scores,
) -> Masks:
    """Masks of ``model``'s prunable weights at ``sparsity``, ranked by ``scores(weights)``."""
    if not callable(scores):
        raise TypeError(f"scores must be a function {{name: weight}} -> {{name: score}}, got {type(scores).__name__}")
    return scope_masks(scores(_weights_to_prune(model, exclude)), sparsity, scope)


# ----------------------------------------------------------------------------------------------------------
# Keeping masks during fine-tuning
# ----------------------------------------------------------------------------------------------------------
class MaskCallback(Callback):
    """Re-apply ``masks`` before training and after every optimizer step, so pruned weights stay zero.

    ``fit`` calls ``on_step_end`` right after ``optimizer.step()``; Adam still moves a pruned weight
    inside the step (its gradient is not zero), and this hook sets it back to zero.
    """

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        self.masks = dict(_check_masks(masks))

    def on_train_begin(self, state: TrainState) -> None:
        """Zero the pruned weights."""
        apply_masks(state.model, self.masks)

    def on_step_end(self, state: TrainState) -> None:
        """Zero them again after the optimizer moved them."""
        apply_masks(state.model, self.masks)


def finetune_masked(model: nn.Module, ctx: Context, masks: Mapping[str, Tensor], epochs: int | None = None,
                    lr: float | None = None) -> nn.Module:
    """Fine-tune ``model`` IN PLACE for ``epochs`` (default ``ctx.budget``; 0 skips) keeping ``masks``."""
    check_ctx(ctx)
    epochs = ctx.budget if epochs is None else check_int("epochs", epochs, min_value=0)
    apply_masks(model, masks)
    if epochs > 0:
        ctx.finetune(model, epochs=epochs, lr=lr, callbacks=[MaskCallback(masks)])
    return model


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(check_model(model))


def _finish(pruned: nn.Module, name: str, masks: Masks, sparsity: float, scope: str, exclude, start: float,
            **info) -> nn.Module:
    """Mark ``pruned`` as masked, with the requested and the measured sparsity and the seconds taken."""
    return mark(pruned, name, "mask", sparsity=sparsity, scope=scope, exclude=list(_check_exclude(exclude)),
                mask_sparsity=mask_sparsity(masks), weight_sparsity=weight_sparsity(pruned),
                seconds=time.perf_counter() - start, **info)


def _one_shot(name: str, model: nn.Module, ctx: Context, sparsity, scope, finetune, exclude, epochs, lr,
              scores: Callable[[dict[str, Tensor]], Scores], **info) -> nn.Module:
    start = time.perf_counter()
    sparsity = check_sparsity(sparsity)
    check_choice("scope", scope, SCOPES)
    check_finetune_ctx(f"{name}_prune", ctx, finetune)
    pruned = _copy(model)
    masks = scope_masks(scores(_weights_to_prune(pruned, exclude)), sparsity, scope)
    apply_masks(pruned, masks)
    if finetune:
        finetune_masked(pruned, ctx, masks, epochs, lr)
    return _finish(pruned, name, masks, sparsity, scope, exclude, start, finetune=bool(finetune), **info)


# ----------------------------------------------------------------------------------------------------------
# One-shot methods
# ----------------------------------------------------------------------------------------------------------
def magnitude_prune(
    model: nn.Module,
    ctx: Context,
    *,
    sparsity: float,
    scope: str = "global",
    finetune: bool = True,
    exclude: str | Iterable[str] = (),
    epochs: int | None = None,
    lr: float | None = None,
) -> nn.Module:
    """Zero the smallest-|w| weights (per layer or globally), then fine-tune ``epochs`` (default
    ``ctx.budget``) with the masks enforced (Han et al. 2015). ``ctx`` may be None with ``finetune=False``."""
    return _one_shot("magnitude", model, ctx, sparsity, scope, finetune, exclude, epochs, lr, magnitude_scores)


def random_prune(
    model: nn.Module,
    ctx: Context,
    *,
    sparsity: float,
    scope: str = "layer",
    finetune: bool = True,
    exclude: str | Iterable[str] = (),
    epochs: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Zero random weights (seed: ``ctx.seed``) -- the control. ``scope="layer"`` by default: global random
    pruning prunes every layer at the same rate anyway, up to sampling noise. ``ctx`` may be None with
    ``finetune=False`` and a ``seed``."""
    check_finetune_ctx("random_prune", ctx, finetune)
    if seed is None and ctx is None:
        raise ValueError("random_prune: without a Context (ctx=None) pass seed= explicitly")
    seed = ctx.seed if seed is None else check_int("seed", seed, min_value=0)
    return _one_shot("random", model, ctx, sparsity, scope, finetune, exclude, epochs, lr,
                     lambda w: random_scores(w, seed), seed=seed)


# ----------------------------------------------------------------------------------------------------------
# Gradual pruning (Zhu & Gupta 2017)
# ----------------------------------------------------------------------------------------------------------
def agp_sparsity(step: int, *, initial_sparsity: float = 0.0, final_sparsity: float, start_step: int = 0,
                 end_step: int) -> float:
    """Zhu & Gupta's schedule s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))**3, with n dt = end - start.

    ``s_i`` before ``start_step``, ``s_f`` from ``end_step`` on. Pruning happens only every ``frequency``
    steps (dt) in :class:`AGPCallback`; this function is the continuous curve it samples.
    """
    check_int("step", step)
    s_i = check_sparsity(initial_sparsity, "initial_sparsity")
    s_f = check_sparsity(final_sparsity, "final_sparsity")
    check_int("start_step", start_step, min_value=0)
    check_int("end_step", end_step, min_value=start_step + 1)
    _check_rising(s_i, s_f)
    if step <= start_step:
        return s_i
    if step >= end_step:
        return s_f
    progress = (step - start_step) / (end_step - start_step)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


def _check_rising(initial: float, final: float) -> None:
    if initial > final:
        raise ValueError(f"initial_sparsity={initial!r} must not exceed final_sparsity={final!r}: gradual pruning "
                         "only adds zeros")


class AGPCallback(Callback):
    """Gradual pruning inside ``fit``: every ``frequency`` optimizer steps from ``start_step`` to ``end_step``,
    recompute ``masks_fn(model, agp_sparsity(step))``; between updates, keep the current masks enforced.

    ``masks_fn(model, sparsity) -> masks`` (e.g. ``functools.partial(make_masks, scope="global")``). Magnitude
    masks are nested: weights already at zero have the lowest scores and stay pruned. If training ends before
    ``end_step``, ``on_train_end`` prunes to ``final_sparsity`` so the result has the promised sparsity.
    ``schedule`` lists the (step, sparsity) pairs applied, for plots.
    """

    def __init__(self, masks_fn: MasksFn | None = None, *, initial_sparsity: float = 0.0, final_sparsity: float,
                 start_step: int = 0, end_step: int, frequency: int = 1) -> None:
        if masks_fn is not None and not callable(masks_fn):
            raise TypeError(f"masks_fn must be a function (model, sparsity) -> masks, got {type(masks_fn).__name__}")
        self.masks_fn: MasksFn = masks_fn or (lambda m, s: make_masks(m, s))
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        _check_rising(self.initial_sparsity, self.final_sparsity)
        self.start_step = check_int("start_step", start_step, min_value=0)
        self.end_step = check_int("end_step", end_step, min_value=start_step + 1)
        self.frequency = check_int("frequency", frequency, min_value=1)
        self.masks: Masks = {}
        self.schedule: list[tuple[int, float]] = []

    def sparsity_at(self, step: int) -> float:
        """The target sparsity after optimizer step ``step``."""
        return agp_sparsity(step, initial_sparsity=self.initial_sparsity, final_sparsity=self.final_sparsity,
                            start_step=self.start_step, end_step=self.end_step)

    def _prune(self, state: TrainState, sparsity: float) -> None:
        self.masks = {k: m.cpu() for k, m in self.masks_fn(state.model, sparsity).items()}   # kept on the CPU
        self.schedule.append((state.step, sparsity))

    def on_train_begin(self, state: TrainState) -> None:
        """Apply the initial sparsity when the schedule starts at step 0."""
        if self.start_step == 0 and self.initial_sparsity > 0:
            self._prune(state, self.initial_sparsity)
        apply_masks(state.model, self.masks)

    def on_step_end(self, state: TrainState) -> None:
        """Prune on the schedule's steps, then keep the current masks."""
        t = state.step
        if self.start_step <= t <= self.end_step and ((t - self.start_step) % self.frequency == 0
                                                      or t == self.end_step):
            self._prune(state, self.sparsity_at(t))
        apply_masks(state.model, self.masks)

    def on_train_end(self, state: TrainState) -> None:
        """Reach ``final_sparsity`` even if training stopped early."""
        if not self.schedule or self.schedule[-1][1] < self.final_sparsity:
            self._prune(state, self.final_sparsity)
        apply_masks(state.model, self.masks)


def agp_prune(
    model: nn.Module,
    ctx: Context,
    *,
    sparsity: float,
    scope: str = "global",
    epochs: int | None = None,
    initial_sparsity: float = 0.0,
    prune_fraction: float = 0.75,
    frequency: int | None = None,
    exclude: str | Iterable[str] = (),
    lr: float | None = None,
) -> nn.Module:
    """Gradual magnitude pruning (Zhu & Gupta 2017) during ``epochs`` of fine-tuning (default ``ctx.budget``,
    at least 1): sparsity rises on the cubic schedule over the first ``prune_fraction`` of the steps, the rest
    recovers at ``sparsity``. ``frequency`` (dt) defaults to about 20 pruning events."""
    start = time.perf_counter()
    check_ctx(ctx)
    sparsity = check_sparsity(sparsity)
    _check_rising(check_sparsity(initial_sparsity, "initial_sparsity"), sparsity)
    check_choice("scope", scope, SCOPES)
    check_float("prune_fraction", prune_fraction, min_value=0.0, max_value=1.0)
    epochs = max(1, ctx.budget) if epochs is None else check_int("epochs", epochs, min_value=1)
    total = epochs * math.ceil(len(ctx.data.train) / ctx.batch_size)
    end_step = max(1, int(round(prune_fraction * total)))
    frequency = max(1, end_step // 20) if frequency is None else check_int("frequency", frequency, min_value=1)
    pruned = _copy(model)
    _weights_to_prune(pruned, exclude)  # validate exclude early
    agp = AGPCallback(lambda m, s: make_masks(m, s, scope=scope, exclude=exclude),
                      initial_sparsity=initial_sparsity, final_sparsity=sparsity, start_step=0,
                      end_step=end_step, frequency=frequency)
    ctx.finetune(pruned, epochs=epochs, lr=lr, callbacks=[agp])
    return _finish(pruned, "agp", agp.masks, sparsity, scope, exclude, start, epochs=epochs, end_step=end_step,
                   frequency=frequency, schedule=[[t, s] for t, s in agp.schedule])


# ----------------------------------------------------------------------------------------------------------
# Iterative pruning with retraining (Han et al. 2015)
# ----------------------------------------------------------------------------------------------------------
def iterative_sparsities(sparsity: float, iterations: int) -> list[float]:
    """Sparsity after each iteration: the kept fraction shrinks geometrically, (1 - s) ** (i / iterations)."""
    sparsity = check_sparsity(sparsity)
    check_int("iterations", iterations, min_value=1)
    levels = [1.0 - (1.0 - sparsity) ** (i / iterations) for i in range(1, iterations + 1)]
    levels[-1] = sparsity
    return levels


def iterative_prune(
    model: nn.Module,
    ctx: Context,
    *,
    sparsity: float,
    iterations: int = 3,
    scope: str = "global",
    epochs_per_iteration: int | None = None,
    exclude: str | Iterable[str] = (),
    lr: float | None = None,
) -> nn.Module:
    """Prune by magnitude to each of :func:`iterative_sparsities` in turn, fine-tuning ``epochs_per_iteration``
    (default ``ctx.budget``) with the masks kept after each pruning step."""
    start = time.perf_counter()
    check_ctx(ctx)
    levels = iterative_sparsities(sparsity, iterations)
    check_choice("scope", scope, SCOPES)
    pruned = _copy(model)
    masks: Masks = {}
    for level in levels:
        masks = make_masks(pruned, level, scope=scope, exclude=exclude)
        finetune_masked(pruned, ctx, masks, epochs_per_iteration, lr)
    return _finish(pruned, "iterative", masks, levels[-1], scope, exclude, start, iterations=iterations,
                   levels=levels)


# ----------------------------------------------------------------------------------------------------------
# Second order: OBD with a Fisher (or exact) Hessian diagonal
# ----------------------------------------------------------------------------------------------------------
def _batches(ctx: Context, n_batches: int, batches) -> list[tuple[Tensor, Tensor]]:
    """``batches`` (checked: a non-empty sequence of (input, target) tensor pairs) or training batches of ``ctx``."""
    if batches is None:
        return ctx.calibration_batches(n_batches)
    if isinstance(batches, (str, bytes, Tensor)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be a sequence of (input, target) pairs, got {type(batches).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one (input, target) pair, or None for training batches")
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(t, Tensor) for t in b)):
            raise TypeError(f"batches must hold (input, target) pairs of tensors, got {type(b).__name__}")
        check_finite("batches", b[0])
    return batches


def fisher_diagonal(
    model: nn.Module,
    ctx: Context,
    n_batches: int = 4,
    *,
    micro_batch: int | None = 1,
    exclude: str | Iterable[str] = (),
    batches: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Empirical Fisher diagonal: the mean of squared gradients of the task loss, per prunable weight.

    The gradients are taken on chunks of ``micro_batch`` examples of ``n_batches`` training batches
    (``micro_batch=1``: the per-example empirical Fisher, the usual OBD/WoodFisher proxy of the Hessian
    diagonal; ``micro_batch=None``: one gradient per whole batch, which near a minimum estimates the same
    diagonal divided by the batch size, from far fewer samples). The model runs in eval mode (BatchNorm uses
    its running statistics) and gradients go through ``torch.autograd.grad``: ``model`` is not changed.

    For a loss that is a negative log-likelihood (cross-entropy; MSE = Gaussian NLL with variance 1/2), the
    empirical Fisher approaches the Hessian near a well-fit optimum; elsewhere it is a positive proxy.
    """
    check_ctx(ctx)
    check_int("n_batches", n_batches, min_value=1)
    if micro_batch is not None:
        check_int("micro_batch", micro_batch, min_value=1)
    weights = _weights_to_prune(model, exclude)
    names, params = list(weights), list(weights.values())
    fisher = [torch.zeros_like(p) for p in params]
    count = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in _batches(ctx, n_batches, batches):
            size = len(x) if micro_batch is None else micro_batch
            for i in range(0, len(x), size):
                loss = ctx.task.loss(run_forward(model, x[i:i + size], "batches"), y[i:i + size])
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f += g.detach() ** 2
                count += 1
    finally:
        model.train(was_training)
    return {name: f / max(1, count) for name, f in zip(names, fisher)}


def hessian_diagonal(
    model: nn.Module,
    ctx: Context,
    n_batches: int = 4,
    *,
    exclude: str | Iterable[str] = (),
    batches: Sequence[tuple[Tensor, Tensor]] | None = None,
    max_params: int = 20_000,
) -> dict[str, Tensor]:
    """The EXACT Hessian diagonal of the mean task loss over the batches, by double backpropagation:
    one extra backward pass per weight, so only for tiny models (``max_params``). Eval mode; no side effects.
    Use it to check :func:`fisher_diagonal` (tests do, on linear regression where H_jj = 2/N sum_i x_ij**2).
    """
    check_ctx(ctx)
    check_int("n_batches", n_batches, min_value=1)
    check_int("max_params", max_params, min_value=1)
    weights = _weights_to_prune(model, exclude)
    total = sum(w.numel() for w in weights.values())
    if total > max_params:
        raise ValueError(f"hessian_diagonal needs one backward pass per weight; the model has {total} prunable "
                         f"weights > max_params={max_params}; use fisher_diagonal for larger models")
    names, params = list(weights), list(weights.values())
    data = _batches(ctx, n_batches, batches)
    hess = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    try:
        for x, y in data:
            loss = ctx.task.loss(run_forward(model, x, "batches"), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for h, p, g in zip(hess, params, grads):
                flat_g = g.reshape(-1)
                for j in range(flat_g.numel()):
                    (row,) = torch.autograd.grad(flat_g[j], p, retain_graph=True, allow_unused=True)
                    if row is not None:
                        h.view(-1)[j] += row.reshape(-1)[j].detach()
    finally:
        model.train(was_training)
    return {name: h / len(data) for name, h in zip(names, hess)}


def obd_scores(weights: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> Scores:
    """OBD saliency 0.5 * H_ii * w_i**2 (LeCun et al. 1990): the loss increase from zeroing w_i, with the
    Hessian diagonal H_ii estimated by ``fisher`` (off-diagonal terms and the gradient term ignored)."""
    _check_tensors("weights", weights)
    _check_tensors("fisher", fisher, finite=True)
    missing = [name for name in weights if name not in fisher]
    if missing:
        raise ValueError(f"fisher has no entry for {missing}")
    for name, w in weights.items():
        if fisher[name].shape != w.shape:
            raise ValueError(f"fisher[{name!r}] has shape {tuple(fisher[name].shape)}, the weight {tuple(w.shape)}")
    return {name: 0.5 * fisher[name].detach() * w.detach() ** 2 for name, w in weights.items()}


def obd_prune(
    model: nn.Module,
    ctx: Context,
    *,
    sparsity: float,
    scope: str = "layer",
    finetune: bool = True,
    exclude: str | Iterable[str] = (),
    n_batches: int = 4,
    micro_batch: int | None = 1,
    epochs: int | None = None,
    lr: float | None = None,
) -> nn.Module:
    """Prune the lowest OBD saliencies (empirical-Fisher Hessian diagonal, :func:`fisher_diagonal`), then
    fine-tune with the masks kept.

    Measured caveat (digits baseline, 90%): with ``scope="global"`` the Fisher of the deepest conv is orders of
    magnitude below the others and that layer is pruned away entirely (accuracy at chance even after
    fine-tuning); ``scope="layer", exclude=("first", "last")`` keeps every layer alive but still trails
    magnitude pruning. The diagonal, second-order-at-a-minimum model of the loss breaks at such sparsity.
    """
    check_sparsity(sparsity)
    check_choice("scope", scope, SCOPES)
    check_bool("finetune", finetune)
    fisher = fisher_diagonal(model, ctx, n_batches, micro_batch=micro_batch, exclude=exclude)
    return _one_shot("obd", model, ctx, sparsity, scope, finetune, exclude, epochs, lr,
                     lambda w: obd_scores(w, fisher), n_batches=n_batches, micro_batch=micro_batch)


# ----------------------------------------------------------------------------------------------------------
# Group lasso (Wen et al. 2016)
# ----------------------------------------------------------------------------------------------------------
def _conv_weights(model: nn.Module, exclude) -> dict[str, Tensor]:
    return {name: w for name, w in prunable_weights(model, exclude).items() if w.dim() == 4}


def _group_view(w: Tensor, groups: str) -> Tensor:
    """(groups, elements): one row per output filter or per input channel of a conv weight."""
    check_choice("groups", groups, GROUPS)
    return w.flatten(1) if groups == "filters" else w.transpose(0, 1).flatten(1)


def group_lasso_penalty(model: nn.Module, groups: str = "filters", exclude: str | Iterable[str] = ("last",)
                        ) -> Tensor:
    """Sum over conv layers of the L2 norms of their filters (``groups="filters"``: weight[o, :, :, :]) or
    input channels (``"channels"``: weight[:, c, :, :]). Differentiable. The last prunable layer (the task's
    output layer) is excluded by default: its filters are the outputs."""
    check_choice("groups", groups, GROUPS)
    norms = [_group_view(w, groups).norm(dim=1).sum() for w in _conv_weights(model, exclude).values()]
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).sum()


def group_lasso_loss(strength: float, groups: str = "filters", exclude: str | Iterable[str] = ("last",)):
    """An ``extra_loss(model, x, output, target)`` for ``fit``: ``strength * group_lasso_penalty(model)``."""
    strength = check_float("strength", strength, min_value=0.0)
    check_choice("groups", groups, GROUPS)
    exclude = _check_exclude(exclude)

    def extra_loss(model: nn.Module, x: Tensor, output: Tensor, target: Tensor) -> Tensor:
        return strength * group_lasso_penalty(model, groups, exclude)

    return extra_loss


def group_norms(model: nn.Module, groups: str = "filters", exclude: str | Iterable[str] = ("last",)
                ) -> pd.DataFrame:
    """One row per group: ``layer``, ``group`` (filter or channel index), ``norm`` (L2), ``relative_norm``
    (norm / the layer's largest group norm)."""
    rows = []
    for name, w in _conv_weights(model, exclude).items():
        norms = _group_view(w.detach(), groups).norm(dim=1)
        top = float(norms.max()) if norms.numel() else 0.0
        rows += [{"layer": name, "group": i, "norm": float(n), "relative_norm": float(n) / top if top else 0.0}
                 for i, n in enumerate(norms)]
    return pd.DataFrame(rows, columns=["layer", "group", "norm", "relative_norm"])


def group_masks(model: nn.Module, threshold: float, groups: str = "filters", *, relative: bool = False,
                exclude: str | Iterable[str] = ("last",)) -> Masks:
    """Masks that zero whole groups whose L2 norm is below ``threshold`` (``relative=True``: below
    ``threshold`` x the layer's largest group norm). At least one group per layer is always kept."""
    check_float("threshold", threshold, min_value=0.0)
    check_bool("relative", relative)
    check_choice("groups", groups, GROUPS)
    masks = {}
    for name, w in _conv_weights(model, exclude).items():
        norms = _group_view(w.detach(), groups).norm(dim=1)
        limit = threshold * float(norms.max()) if relative else threshold
        keep = norms >= limit
        keep[norms.argmax()] = True
        shape = (-1, 1, 1, 1) if groups == "filters" else (1, -1, 1, 1)
        masks[name] = keep.reshape(shape).expand_as(w).clone()
    return masks


def zero_small_groups(model: nn.Module, threshold: float, groups: str = "filters", *, relative: bool = False,
                      exclude: str | Iterable[str] = ("last",)) -> Masks:
    """Zero (IN PLACE) every group below ``threshold`` (see :func:`group_masks`); return the masks."""
    masks = group_masks(model, threshold, groups, relative=relative, exclude=exclude)
    apply_masks(model, masks)
    return masks


def group_lasso_train(
    model: nn.Module,
    ctx: Context,
    *,
    strength: float,
    groups: str = "filters",
    epochs: int | None = None,
    threshold: float = 0.05,
    relative: bool = True,
    exclude: str | Iterable[str] = ("last",),
    lr: float | None = None,
) -> nn.Module:
    """Fine-tune with ``strength * group_lasso_penalty`` for ``epochs`` (default ``ctx.budget``, at least 1),
    then zero the groups below ``threshold`` (relative to the layer's largest by default).

    Caveat: with BatchNorm after a conv, the conv is scale-invariant, so the penalty can shrink all filters
    together; the relative threshold ranks filters within a layer. A zeroed filter still passes its BatchNorm
    bias on as a constant channel: the structured-pruning module removes the filter together with its BN
    channel; here the zeros are only a mask.
    """
    start = time.perf_counter()
    check_ctx(ctx)
    epochs = max(1, ctx.budget) if epochs is None else check_int("epochs", epochs, min_value=1)
    check_float("threshold", threshold, min_value=0.0)
    check_bool("relative", relative)
    if not _conv_weights(check_model(model), exclude):
        raise ValueError(f"group lasso needs Conv2d layers; the model has none left after exclude={exclude!r}")
    trained = _copy(model)
    ctx.finetune(trained, epochs=epochs, lr=lr, extra_loss=group_lasso_loss(strength, groups, exclude))
    masks = zero_small_groups(trained, threshold, groups, relative=relative, exclude=exclude)
    n_groups = sum(int(_group_view(m, groups).any(dim=1).numel()) for m in masks.values())
    kept = sum(int(_group_view(m, groups).any(dim=1).sum()) for m in masks.values())
    return mark(trained, "group_lasso", "mask", strength=float(strength), groups=groups, epochs=epochs,
                threshold=float(threshold), relative=bool(relative), groups_total=n_groups,
                groups_zeroed=n_groups - kept, mask_sparsity=mask_sparsity(masks),
                weight_sparsity=weight_sparsity(trained), seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------
# Sensitivity analysis
# ----------------------------------------------------------------------------------------------------------
def layer_sensitivity(
    model: nn.Module,
    ctx: Context,
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    *,
    split: str = "val",
    exclude: str | Iterable[str] = (),
    scores: ScoreFn = magnitude_scores,
) -> pd.DataFrame:
    """Prune ONE layer at a time to each sparsity (by ``scores``, no fine-tuning) and evaluate on ``split``.

    Columns: ``layer``, ``params``, ``sparsity``, ``metric`` (the task's primary metric name), ``value``,
    ``baseline`` (unpruned value) and ``drop`` (baseline - value for higher-is-better metrics). ``model``
    is not changed (each point prunes a copy).
    """
    check_ctx(ctx)
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Iterable):
        raise TypeError(f"sparsities must be a sequence of numbers in [0, 1), got {type(sparsities).__name__}")
    levels = [check_sparsity(s) for s in sparsities]
    if not levels:
        raise ValueError("sparsities is empty: pass at least one sparsity in [0, 1)")
    check_choice("split", split, ("train", "val", "test"))
    metric = ctx.task.primary_metric
    base = ctx.score(model, split)
    sign = 1.0 if ctx.task.higher_is_better else -1.0
    rows = []
    for name, w in _weights_to_prune(model, exclude).items():
        for level in levels:
            pruned = copy.deepcopy(model)
            weight = dict(pruned.named_parameters())[name]
            apply_masks(pruned, layerwise_masks(scores({name: weight}), level))
            value = ctx.score(pruned, split)
            rows.append({"layer": name, "params": w.numel(), "sparsity": level, "metric": metric,
                         "value": value, "baseline": base, "drop": sign * (base - value)})
    return pd.DataFrame(rows, columns=["layer", "params", "sparsity", "metric", "value", "baseline", "drop"])


__all__ = [
    "AGPCallback", "MaskCallback", "agp_prune", "agp_sparsity", "apply_masks", "check_finetune_ctx", "check_sparsity",
    "fisher_diagonal", "finetune_masked", "global_masks", "group_lasso_loss", "group_lasso_penalty",
    "group_lasso_train", "group_masks", "group_norms", "hessian_diagonal", "iterative_prune",
    "iterative_sparsities", "layer_sensitivity", "layerwise_masks", "magnitude_prune", "magnitude_scores",
    "make_masks", "mask_sparsity", "masks_from_zeros", "obd_prune", "obd_scores", "prunable_weights",
    "random_prune", "random_scores", "scope_masks", "sparsity_table", "weight_sparsity", "zero_small_groups",
]
