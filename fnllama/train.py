"""The train state and the pure train step.

    state = init_state(key, cfg, rule)                    # one pytree: everything that changes
    step = make_train_step(cfg, rule, compute_dtype=torch.bfloat16, grad_accum_steps=4)
    for batch in loader:
        state, metrics = step(state, batch)
        state = state._replace(data=loader.state())         # the loop records the data position

`step(state, batch) -> (new_state, metrics)` never modifies `state` or `batch`: it builds new
tensors (no buffer donation; the previous state stays valid until the caller drops it, which
costs one transient copy of params and optimizer state, as JAX without `donate_argnums`).

What happens in one step, in order:
  1. Count the loss tokens of the global batch (a psum over `dp` of the loss-mask sums).
  2. For each micro-batch: cast the fp32 master params to `compute_dtype`, run the loss, and
     take gradients of `sum(token losses) / global_tokens` (times the loss scale in fp16).
     Summing these over micro-batches and dp ranks gives exactly the gradient of the global
     mean loss, so accumulation and data parallelism match one big batch.
  3. `rule.reduce_grads` sums over `dp` (all-reduce, or reduce-scatter under ZeRO-2).
  4. Global grad norm; a non-finite norm or loss skips the update (fp16: backs off the loss
     scale; bf16/fp32: raises `FloatingPointError` naming the step unless `skip_nan`).
  5. Clip (Megatron / `clip_grad_norm_` rule: coef = min(1, max_norm / (norm + 1e-6))),
     unscale, and `rule.apply` runs the optimizer (possibly on shards) and returns new params.

Gradients come from `value_and_grad` below: a JAX-style pure interface whose engine is
`torch.autograd.grad` over detached copies of the leaves. `torch.func.grad_and_value` gives
the same numbers for the plain model but cannot run through `torch.utils.checkpoint`
(activation recompute), which this path supports.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Protocol

import optree
import torch

from fnllama import device, model, optim, tree
from fnllama import random as fr
from fnllama.config import ModelConfig

PyTree = Any
Batch = dict[str, torch.Tensor]
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------ autodiff

def value_and_grad(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
    """`value_and_grad(fn)(params, *args) -> (value, grads)` (or `((value, aux), grads)`).

    Pure: `params` is not modified and gains no `.grad`; grads come back as a new tree with
    the structure of `params` (zeros for leaves the value does not depend on).
    """
    def wrapped(params: PyTree, *args: Any, **kwargs: Any):
        leaves, spec = optree.tree_flatten(params)
        with torch.enable_grad():
            tracked = [leaf.detach().requires_grad_() for leaf in leaves]
            out = fn(optree.tree_unflatten(spec, tracked), *args, **kwargs)
            value = out[0] if has_aux else out
            grads = torch.autograd.grad(value, tracked, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
        detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
        out = optree.tree_map(detach, out)
        return out, optree.tree_unflatten(spec, grads)
    return wrapped


# ------------------------------------------------------------------ loss scaling

class LossScaleState(NamedTuple):
    scale: torch.Tensor          # 0-d fp32; 1.0 and never changing when not fp16
    good_steps: torch.Tensor     # 0-d int64: clean steps since the last change
    hysteresis: torch.Tensor     # 0-d int64: overflows still tolerated before backing off


class LossScaleConfig(NamedTuple):
    """Dynamic loss scaling as Megatron's DynamicGradScaler (DeepSpeed's is the same idea)."""
    initial_scale: float = 2.0 ** 16
    growth_interval: int = 1000   # clean steps before doubling
    hysteresis: int = 2           # overflows in a row before halving
    min_scale: float = 1.0


def init_loss_scale(dtype: torch.dtype, cfg: LossScaleConfig = LossScaleConfig()) -> LossScaleState:
    scale = cfg.initial_scale if dtype == torch.float16 else 1.0
    return LossScaleState(torch.tensor(scale, dtype=torch.float32), torch.tensor(0), torch.tensor(cfg.hysteresis))


def update_loss_scale(s: LossScaleState, finite: bool, cfg: LossScaleConfig) -> LossScaleState:
    """The next loss-scale state after a step whose grads were `finite` (or not)."""
    if finite:
        good = int(s.good_steps) + 1
        if good >= cfg.growth_interval:
            return LossScaleState(s.scale * 2, torch.tensor(0), torch.tensor(cfg.hysteresis))
        return LossScaleState(s.scale.clone(), torch.tensor(good), s.hysteresis.clone())
    left = int(s.hysteresis) - 1
    if left <= 0:
        halved = torch.clamp(s.scale / 2, min=cfg.min_scale)
        return LossScaleState(halved, torch.tensor(0), torch.tensor(cfg.hysteresis))
    return LossScaleState(s.scale.clone(), torch.tensor(0), torch.tensor(left))


# ------------------------------------------------------------------ state

class TrainState(NamedTuple):
    """Everything a run changes, as one pytree: save it and the run resumes bit for bit."""
    params: PyTree               # fp32 master weights (see fnllama.model for names)
    opt_state: PyTree            # the update rule's state (sharded under ZeRO)
    step: torch.Tensor           # 0-d int64: steps taken (skipped ones included)
    key: torch.Tensor            # PRNG key; per-step keys are fold_in(key, step)
    data: dict[str, Any]         # the loader's position (its `state()`)
    loss_scale: LossScaleState
    skipped: torch.Tensor        # 0-d int64: updates skipped for non-finite grads


class UpdateRule(Protocol):
    """How grads become new params: the dp reduction plus the optimizer.

    `Replicated` (below) keeps full optimizer state on every rank; `fnllama.zero` shards it.
    """

    def init(self, params: PyTree) -> PyTree: ...
    def reduce_grads(self, grads: PyTree) -> PyTree: ...
    def global_norm(self, reduced: PyTree) -> torch.Tensor: ...
    def apply(self, reduced: PyTree, opt_state: PyTree, params: PyTree, *,
              grad_scale: torch.Tensor) -> tuple[PyTree, PyTree]: ...
    def psum(self, x: torch.Tensor) -> torch.Tensor: ...


class Replicated:
    """Every rank holds all optimizer state; grads are all-reduced over `dp` in one flat buffer."""

    def __init__(self, optimizer: optim.GradientTransformation, mesh: Any = None, *, axis: str = "dp",
                 compile: bool = False):
        self.optimizer, self.mesh, self.axis = optimizer, mesh, axis
        # Compiled: inductor fuses the chain itself. Eager: the optimizer's fused path if it has one.
        eager = optimizer.apply if optimizer.apply is not None and not compile else self._scaled_update
        self._update = _maybe_compile(eager, compile)

    def _dp(self) -> int:
        return 1 if self.mesh is None else self.mesh.size(self.axis)

    def init(self, params: PyTree) -> PyTree:
        return self.optimizer.init(params)

    def psum(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._dp() == 1 else self.mesh.psum(x, self.axis)

    def reduce_grads(self, grads: PyTree) -> PyTree:
        if self._dp() == 1:
            return grads
        layout = tree.make_layout(grads)
        return tree.unflatten(self.mesh.psum(tree.flatten(grads, layout), self.axis), layout)

    def global_norm(self, reduced: PyTree) -> torch.Tensor:
        return optim.global_norm(reduced)

    def _scaled_update(self, reduced, opt_state, params, grad_scale):
        leaves, spec = optree.tree_flatten(reduced)
        grads = optree.tree_unflatten(spec, torch._foreach_mul(leaves, grad_scale))
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state

    def apply(self, reduced, opt_state, params, *, grad_scale):
        return self._update(reduced, opt_state, params, grad_scale)


def as_rule(optimizer_or_rule: Any, mesh: Any = None) -> UpdateRule:
    if isinstance(optimizer_or_rule, optim.GradientTransformation):
        return Replicated(optimizer_or_rule, mesh)
    return optimizer_or_rule


def init_state(key: fr.Key, cfg: ModelConfig, rule: Any, *, params: PyTree | None = None,
               compute_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               loss_scale: LossScaleConfig = LossScaleConfig()) -> TrainState:
    """A fresh TrainState: params from `key` (or the given ones, e.g. from HF), in fp32."""
    init_key, run_key = fr.split(key, 2)
    if params is None:
        params = model.init(init_key, cfg, dtype=torch.float32, device=device)
    else:
        params = optree.tree_map(lambda t: t.detach().to(device=device, dtype=torch.float32), params)
    return TrainState(params=params, opt_state=as_rule(rule).init(params), step=torch.tensor(0),
                      key=run_key, data={}, loss_scale=init_loss_scale(compute_dtype, loss_scale),
                      skipped=torch.tensor(0))


# ------------------------------------------------------------------ step

def split_micro_batches(batch: Batch | list[Batch], n: int) -> list[Batch]:
    """`n` micro-batches: a list is taken as is, a dict is cut along dim 0 into `n` equal parts."""
    if isinstance(batch, (list, tuple)):
        if len(batch) != n:
            raise ValueError(f"got {len(batch)} micro-batches, expected grad_accum_steps={n}")
        return list(batch)
    size = next(iter(batch.values())).shape[0]
    if size % n:
        raise ValueError(f"batch of {size} rows does not split into grad_accum_steps={n} micro-batches")
    parts = {k: v.chunk(n) if isinstance(v, torch.Tensor) else [v] * n for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


def _token_count(mb: Batch) -> torch.Tensor:
    mask = mb.get("loss_mask")
    return mb["labels"].new_tensor(mb["labels"].numel(), dtype=torch.float32) if mask is None \
        else mask.float().sum()


def _maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """torch.compile `fn` (inductor); fall back to eager, with a warning, if it cannot compile."""
    if not enabled:
        return fn
    compiled = torch.compile(fn)
    state = {"fn": compiled}

    def run(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            if state["fn"] is fn:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
            state["fn"] = fn
            return fn(*args, **kwargs)
    return run


def make_train_step(cfg: ModelConfig, rule: Any, *, mesh: Any = None,
                    compute_dtype: torch.dtype = torch.float32, grad_accum_steps: int = 1,
                    recompute: model.Recompute = "none", clip_grad: float | None = 1.0,
                    schedule: optim.Schedule | None = None, compile: bool = False,
                    skip_nan: bool = False, loss_scale: LossScaleConfig = LossScaleConfig(),
                    loss_fn: LossFn = model.loss) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Build `step(state, batch) -> (new_state, metrics)`.

    Args:
      rule: a `GradientTransformation` (replicated over `mesh`) or an `UpdateRule` (e.g. ZeRO).
      compute_dtype: fp32, bf16 or fp16 (fp16 turns on dynamic loss scaling).
      grad_accum_steps: micro-batches per step; `batch` is a list of them or one dict to cut.
      clip_grad: max global grad norm (None: no clipping).
      schedule: the learning-rate schedule, reported in the metrics as `lr`.
      skip_nan: on a non-finite loss/grad in bf16/fp32, skip the update and count it instead of raising.
      loss_fn: `loss_fn(params, batch, cfg, recompute=...) -> (mean_loss, num_tokens)`.
    """
    if compile and isinstance(rule, optim.GradientTransformation):
        rule = Replicated(rule, mesh, compile=True)   # the optimizer update is compiled too
    rule = as_rule(rule, mesh)
    fp16 = compute_dtype == torch.float16
    device.tune_host_allocator()   # fresh buffers every step: let glibc reuse them (see its docstring)

    def scaled_loss(params, mb, denom, scale):
        p = params if compute_dtype == torch.float32 else optree.tree_map(lambda t: t.to(compute_dtype), params)
        mean, n = loss_fn(p, mb, cfg, recompute=recompute)
        loss_sum = mean * n
        return loss_sum * (scale / denom), loss_sum.detach()

    grad_fn = value_and_grad(_maybe_compile(scaled_loss, compile), has_aux=True)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        micro = split_micro_batches(batch, grad_accum_steps)
        tokens = rule.psum(torch.stack([_token_count(mb) for mb in micro]).sum())
        scale = state.loss_scale.scale
        grads, loss_sum = None, torch.zeros((), dtype=torch.float32)
        for mb in micro:
            (_, part_loss), g = grad_fn(state.params, mb, tokens, scale)
            loss_sum = loss_sum + part_loss.float()
            grads = g if grads is None else optree.tree_map(torch.add, grads, g)
        loss = rule.psum(loss_sum) / tokens
        reduced = rule.reduce_grads(grads)
        grad_norm = rule.global_norm(reduced) / scale
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss))
        step_no = int(state.step)
        if not finite and not fp16 and not skip_nan:
            raise FloatingPointError(
                f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} at step {step_no} "
                f"(loss={loss.item()}, grad_norm={grad_norm.item()}); pass skip_nan/--skip-nan to skip such steps")
        params, opt_state = state.params, state.opt_state
        if finite:
            coef = torch.ones(()) if clip_grad is None else torch.clamp(clip_grad / (grad_norm + 1e-6), max=1.0)
            params, opt_state = rule.apply(reduced, opt_state, params, grad_scale=coef / scale)
        new_scale = update_loss_scale(state.loss_scale, finite, loss_scale) if fp16 else state.loss_scale
        new_state = TrainState(params, opt_state, state.step + 1, state.key, state.data, new_scale,
                               state.skipped + (0 if finite else 1))
        metrics = {"step": step_no + 1, "loss": loss.item(), "grad_norm": grad_norm.item(),
                   "tokens": int(tokens.item()), "loss_scale": float(scale), "skipped": not finite,
                   "lr": _current_lr(schedule, state.opt_state)}
        return new_state, metrics

    return step


def _update_count(opt_state: PyTree) -> int | None:
    """The optimizer's update count: the first 0-d int `count` leaf found in its state."""
    for leaf in optree.tree_leaves(opt_state):
        if isinstance(leaf, torch.Tensor) and leaf.ndim == 0 and not leaf.is_floating_point():
            return int(leaf)
    return None


def _current_lr(schedule: optim.Schedule | None, opt_state: PyTree) -> float:
    """The learning rate this step's update used: schedule(updates applied before it)."""
    if schedule is None:
        return math.nan
    count = _update_count(opt_state)
    return float(schedule(count if count is not None else 0))
