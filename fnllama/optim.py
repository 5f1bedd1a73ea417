"""Optimizers as pure gradient transformations, in the optax mould.

A `GradientTransformation` is a NamedTuple of two pure functions:

    init(params) -> opt_state
    update(updates, opt_state, params=None) -> (updates, opt_state)

and `apply_updates(params, updates)` adds the final updates to the params. Small
primitives (`scale_by_adam`, `add_decayed_weights`, `clip_by_global_norm`, ...) are
composed with `chain`; `adamw` and `sgd` are nothing but such chains.

Contract (JAX-like values on torch tensors):
  * Nothing an `update` receives is mutated: not the updates, not the params, not the old
    state. Everything it returns is freshly allocated and never aliases its inputs. Treat
    returned tensors as immutable values (a returned update may share storage with the
    returned new state, e.g. `trace` without nesterov).
  * Optimizer state is fp32 whatever the param dtype; step counters are 0-d int64 tensors
    on the params' device.
  * Trees may be any optree pytree of tensors: the nested param dict, or (for ZeRO) a dict
    of flat 1-D fp32 buffers. Leaves are processed with `torch._foreach_*` ops.

Learning rates on the fly. Inside `update` the schedule is evaluated as *tensor math* on
the 0-d `count` tensor (no `.item()`, no host sync, no Python float that changes every
step), so an update traced by `torch.compile` has no graph break and no per-step
recompile. The lr therefore is a 0-d fp32 tensor, within 1 ulp-ish (~1e-7 relative) of
the Python-float value that `schedule(int)` returns. Adam's bias corrections are
computed the same way, as `-expm1(t * log(b))`, which keeps `1 - b**t` accurate in fp32.

Schedule convention: `schedule(count)`, where `count` is the number of updates applied so
far. The first update uses `schedule(0)` (0.0 during a warmup), exactly like Megatron's
`OptimizerParamScheduler` (initialised with `step(0)` and stepped after each
`optimizer.step()`) and like `torch.optim.lr_scheduler.LambdaLR(opt, lambda s:
schedule(s) / lr)` stepped after each `optimizer.step()`.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, NamedTuple

import optree
import torch

from fnllama.errors import ConfigError
from fnllama.tree import path_str

PyTree = Any
Params = PyTree
Updates = PyTree
OptState = Any
Schedule = Callable[[Any], Any]  # int -> float, or 0-d int tensor -> 0-d fp32 tensor
Mask = Any  # pytree of bool / tensor leaves matching params, or params -> such a tree


class GradientTransformation(NamedTuple):
    """A pair of pure functions: `init(params)` and `update(updates, state, params)`.

    `apply`, when present, is an optional fast path with the same result (to rounding) as
    scaling the grads, `update`, then `apply_updates`:
    `apply(grads, state, params, grad_scale) -> (new_params, new_state)`. `adamw` has one
    built on torch's fused AdamW kernel; `chain` and the primitives have none.
    """

    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Updates, OptState]]
    apply: Callable[..., tuple[Params, OptState]] | None = None


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor  # 0-d int64: updates applied so far
    mu: PyTree  # fp32 first moments, shaped like params
    nu: PyTree  # fp32 second moments, shaped like params


class TraceState(NamedTuple):
    trace: PyTree  # fp32 momentum buffers, shaped like params


class ScaleByScheduleState(NamedTuple):
    count: torch.Tensor  # 0-d int64: updates applied so far


# ---------------------------------------------------------------- tree helpers


def _flatten(tree: PyTree) -> tuple[list, Any]:
    return optree.tree_flatten(tree)


def _check_structure(expected: Any, found: Any, what: str, where: str) -> None:
    if expected != found:
        raise ValueError(f"{where}: {what} has structure {found}, expected {expected} (the params' structure)")


def _to_fp32(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x if x.dtype == torch.float32 else x.to(torch.float32) for x in leaves]


def _zero_count(leaves: list[torch.Tensor]) -> torch.Tensor:
    device = leaves[0].device if leaves else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _expect_state(state: Any, cls: type, name: str) -> None:
    if not isinstance(state, cls):
        raise ValueError(f"{name}: opt_state is {type(state).__name__}, expected {cls.__name__}; "
                         "was the state made by a different optimizer?")


def _times(tree: PyTree, factor: Any) -> PyTree:
    """A new tree: every leaf times `factor` (a float or a 0-d tensor), in one foreach call."""
    leaves, spec = _flatten(tree)
    return optree.tree_unflatten(spec, torch._foreach_mul(leaves, factor) if leaves else [])


def _transform_name(t: GradientTransformation) -> str:
    return getattr(t.init, "__qualname__", repr(t.init)).split(".<locals>")[0]


# ---------------------------------------------------------------- composition


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns new params `p + u`, cast back to each param's dtype; inputs are untouched."""
    p_leaves, spec = _flatten(params)
    u_leaves, u_spec = _flatten(updates)
    _check_structure(spec, u_spec, "updates", "apply_updates")
    same = [i for i, (p, u) in enumerate(zip(p_leaves, u_leaves)) if p.dtype == u.dtype]
    out = [None] * len(p_leaves)
    if same:
        for i, x in zip(same, torch._foreach_add([p_leaves[i] for i in same], [u_leaves[i] for i in same])):
            out[i] = x
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        if out[i] is None:  # e.g. bf16 params + fp32 updates: add in fp32, round once
            out[i] = (p.to(torch.float32) + u.to(torch.float32)).to(p.dtype)
    return optree.tree_unflatten(spec, out)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies `transforms` in order; the state is a tuple with one sub-state each."""
    names = tuple(_transform_name(t) for t in transforms)

    def init_fn(params):
        return tuple(t.init(params) for t in transforms)

    def update_fn(updates, state, params=None):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            found = (f"{type(state).__name__} of {len(state)} ({', '.join(type(s).__name__ for s in state)})"
                     if isinstance(state, tuple) else type(state).__name__)
            raise ValueError(f"chain of {len(transforms)} transforms ({', '.join(names)}) got opt_state {found}; "
                             "was the state made by a different optimizer?")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------- clipping


def global_norm(tree: PyTree) -> torch.Tensor:
    """L2 norm over all leaves as a 0-d fp32 tensor (per-leaf norms accumulated in fp32)."""
    leaves, _ = _flatten(tree)
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(leaves, 2, dtype=torch.float32)
    device = leaves[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scales all updates by `min(1, max_norm / (global_norm + 1e-6))`.

    This is `torch.nn.utils.clip_grad_norm_`'s rule (including its 1e-6), always applied
    as a multiplication so no host sync is needed. A non-finite norm gives non-finite
    updates: the train step checks the norm before applying them.
    """
    if not max_norm > 0:
        raise ConfigError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm}")

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None):
        del params
        _expect_state(state, EmptyState, "clip_by_global_norm")
        coef = (max_norm / (global_norm(updates) + 1e-6)).clamp(max=1.0)
        return _times(updates, coef), state

    return GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------- moments


def _bias_correction(decay: float, t: torch.Tensor) -> torch.Tensor:
    """`1 - decay**t` for a 0-d fp32 `t`, accurate in fp32 even when the result is tiny."""
    if decay == 0.0:
        return torch.ones_like(t)
    return -torch.expm1(t * math.log(decay))


def _check_decay(name: str, field: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name}: {field} must be in [0, 1), got {value}")


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Rescales gradients by Adam's bias-corrected moments.

    With t = count + 1: mu = b1 mu + (1 - b1) g, nu = b2 nu + (1 - b2) g^2, and the update
    is (mu / (1 - b1^t)) / (sqrt(nu) / sqrt(1 - b2^t) + eps). Moments are fp32 whatever
    the gradient dtype.
    """
    _check_decay("scale_by_adam", "b1", b1)
    _check_decay("scale_by_adam", "b2", b2)
    if eps < 0:
        raise ConfigError(f"scale_by_adam: eps must be >= 0, got {eps}")

    def init_fn(params):
        leaves, spec = _flatten(params)
        zeros = lambda: optree.tree_unflatten(spec, [torch.zeros_like(p, dtype=torch.float32) for p in leaves])
        return ScaleByAdamState(count=_zero_count(leaves), mu=zeros(), nu=zeros())

    def update_fn(updates, state, params=None):
        del params
        _expect_state(state, ScaleByAdamState, "scale_by_adam")
        g, spec = _flatten(updates)
        mu, mu_spec = _flatten(state.mu)
        nu, _ = _flatten(state.nu)
        _check_structure(mu_spec, spec, "updates", "scale_by_adam")
        if not g:
            return updates, ScaleByAdamState(state.count + 1, state.mu, state.nu)
        g = _to_fp32(g)
        mu = torch._foreach_lerp(mu, g, 1.0 - b1)  # new tensors
        nu = torch._foreach_mul(nu, b2)
        torch._foreach_addcmul_(nu, g, g, value=1.0 - b2)  # in place on our own new tensors
        count = state.count + 1
        t = count.to(torch.float32)
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, _bias_correction(b2, t).sqrt())
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(mu, denom)
        torch._foreach_div_(out, _bias_correction(b1, t))
        new_state = ScaleByAdamState(count, optree.tree_unflatten(spec, mu), optree.tree_unflatten(spec, nu))
        return optree.tree_unflatten(spec, out), new_state

    return GradientTransformation(init_fn, update_fn)


def trace(decay: float, *, nesterov: bool = False) -> GradientTransformation:
    """Momentum as in `torch.optim.SGD` (dampening 0): buf = decay * buf + g.

    The update is `buf`, or `g + decay * buf` with nesterov. The first step gives buf = g,
    the same as torch's lazily created buffer.
    """
    _check_decay("trace", "decay (momentum)", decay)

    def init_fn(params):
        leaves, spec = _flatten(params)
        return TraceState(optree.tree_unflatten(spec, [torch.zeros_like(p, dtype=torch.float32) for p in leaves]))

    def update_fn(updates, state, params=None):
        del params
        _expect_state(state, TraceState, "trace")
        g, spec = _flatten(updates)
        buf, buf_spec = _flatten(state.trace)
        _check_structure(buf_spec, spec, "updates", "trace")
        if not g:
            return updates, state
        g = _to_fp32(g)
        buf = torch._foreach_mul(buf, decay)
        torch._foreach_add_(buf, g)
        out = torch._foreach_add(g, buf, alpha=decay) if nesterov else buf
        return optree.tree_unflatten(spec, out), TraceState(optree.tree_unflatten(spec, buf))

    return GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------- weight decay and masks


def default_decay_mask(params: Params, *, exempt_embeddings: bool = False) -> PyTree:
    """A bool tree matching `params`: True where weight decay applies.

    Exempts tensors with ndim <= 1 (norm scales, biases), and with `exempt_embeddings`
    any leaf under a path component starting with "embed". Megatron's default decays
    embeddings, hence False. Meant for the structured param tree; for a tree of flat
    buffers, flatten `mask_as_multipliers(...)` with the same layout instead.
    """

    def decays(path: tuple, leaf: torch.Tensor) -> bool:
        if leaf.ndim <= 1:
            return False
        return not (exempt_embeddings and any(str(k).startswith("embed") for k in path))

    return _map_with_path(decays, params, ())


# Mask trees hold Python bools, and torch.compile (dynamo 2.13) fails to run optree over
# containers of constants built inside the graph. So masks are walked in plain Python,
# in optree's leaf order (dict keys sorted, OrderedDict in insertion order, sequences in
# order), for the containers param trees use: dict, list, tuple and NamedTuple.


def _children(tree: Any, path: tuple) -> list[tuple[Any, Any]]:
    """(key, child) pairs in optree's leaf order; raises for containers we do not walk."""
    if isinstance(tree, dict):
        keys = list(tree)
        if not isinstance(tree, collections.OrderedDict):
            try:
                keys = sorted(keys)
            except TypeError:
                pass
        return [(k, tree[k]) for k in keys]
    if isinstance(tree, (list, tuple)):
        return list(enumerate(tree))
    raise ValueError(f"mask at {_path_str(path)!r}: cannot walk a {type(tree).__name__} (dict, list, tuple only)")


def _path_str(path: tuple) -> str:
    return path_str(path) or "<root>"


def _map_with_path(fn: Callable, tree: Any, path: tuple) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(path, tree)
    if tree is None:
        return None
    if isinstance(tree, dict):
        return type(tree)((k, _map_with_path(fn, v, path + (k,))) for k, v in tree.items())
    mapped = [_map_with_path(fn, v, path + (i,)) for i, v in _children(tree, path)]
    return type(tree)(*mapped) if hasattr(tree, "_fields") else type(tree)(mapped)


def _mask_leaves(mask: Any, params: Any, path: tuple = ()) -> list:
    """The mask's leaves (bools or tensors) in the order of `optree.tree_leaves(params)`."""
    if isinstance(params, torch.Tensor):
        if isinstance(mask, (bool, torch.Tensor)):
            return [mask]
        raise ValueError(f"mask at {_path_str(path)!r}: expected a bool or tensor, found {type(mask).__name__}")
    if params is None:
        return []
    if type(mask) is not type(params) and not (isinstance(mask, dict) and isinstance(params, dict)):
        raise ValueError(f"mask at {_path_str(path)!r}: expected a {type(params).__name__} like the params, "
                         f"found {type(mask).__name__}")
    if len(mask) != len(params) or (isinstance(params, dict) and set(mask) != set(params)):
        want = sorted(map(str, params)) if isinstance(params, dict) else f"{len(params)} entries"
        got = sorted(map(str, mask)) if isinstance(mask, dict) else f"{len(mask)} entries"
        raise ValueError(f"mask at {_path_str(path)!r}: expected {want} as in the params, found {got}")
    return [m for k, child in _children(params, path) for m in _mask_leaves(mask[k], child, path + (k,))]


def _resolve_mask(mask: Mask, params: Params, where: str) -> list:
    try:
        return _mask_leaves(mask(params) if callable(mask) else mask, params)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def mask_as_multipliers(mask: Mask, params: Params) -> PyTree:
    """The mask as fp32 0/1 tensors shaped like each param (flatten these for ZeRO shards)."""
    p_leaves, spec = _flatten(params)
    m_leaves = _resolve_mask(mask, params, "mask_as_multipliers")
    out = [torch.ones_like(p, dtype=torch.float32) * (m.to(torch.float32) if isinstance(m, torch.Tensor) else float(bool(m)))
           for p, m in zip(p_leaves, m_leaves)]
    return optree.tree_unflatten(spec, out)


def add_decayed_weights(weight_decay: float, mask: Mask | None = None) -> GradientTransformation:
    """Adds `weight_decay * mask * params` to the updates (decoupled decay when chained
    after a rescaling such as `scale_by_adam`).

    Args:
      weight_decay: the decay coefficient (scaled later by the learning rate).
      mask: None (decay every leaf), a pytree matching params, or a callable
        `params -> pytree`. A leaf is a bool (decay or not) or a tensor multiplier
        broadcastable to the param, e.g. a float 0/1 tensor for a flat ZeRO buffer.
    """
    if weight_decay < 0:
        raise ConfigError(f"add_decayed_weights: weight_decay must be >= 0, got {weight_decay}")

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None):
        _expect_state(state, EmptyState, "add_decayed_weights")
        if params is None:
            raise ValueError("add_decayed_weights: update() needs params (pass them as the third argument)")
        u, spec = _flatten(updates)
        p, p_spec = _flatten(params)
        _check_structure(p_spec, spec, "updates", "add_decayed_weights")
        m = [True] * len(p) if mask is None else _resolve_mask(mask, params, "add_decayed_weights")
        return optree.tree_unflatten(spec, _decay_leaves(u, p, m, weight_decay)), state

    return GradientTransformation(init_fn, update_fn)


def _decay_leaves(u: list, p: list, m: list, wd: float) -> list:
    """u + wd * m * p per leaf, grouped so each kind of mask leaf takes one foreach call."""
    out = [None] * len(u)
    on = [i for i, x in enumerate(m) if not isinstance(x, torch.Tensor) and bool(x)]
    mult = [i for i, x in enumerate(m) if isinstance(x, torch.Tensor)]
    pick = lambda seq, idx: [seq[i] for i in idx]
    if on:
        new = torch._foreach_add(pick(u, on), _match_dtypes(pick(p, on), pick(u, on)), alpha=wd)
        for i, x in zip(on, new):
            out[i] = x
    if mult:
        factors = [x.to(u[i].dtype) for i, x in zip(mult, pick(m, mult))]
        new = torch._foreach_addcmul(pick(u, mult), _match_dtypes(pick(p, mult), pick(u, mult)), factors, value=wd)
        for i, x in zip(mult, new):
            out[i] = x
    return [x if x is not None else u[i].clone() for i, x in enumerate(out)]


def _match_dtypes(xs: list, like: list) -> list:
    return [x if x.dtype == y.dtype else x.to(y.dtype) for x, y in zip(xs, like)]


# ---------------------------------------------------------------- scaling and learning rates


def scale(factor: float) -> GradientTransformation:
    """Multiplies every update by a constant `factor`."""

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None):
        del params
        _expect_state(state, EmptyState, "scale")
        return _times(updates, factor), state

    return GradientTransformation(init_fn, update_fn)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiplies updates by `schedule(count)`, count = updates applied so far (0 first).

    `schedule` is called with the 0-d int64 count tensor and should return a 0-d tensor
    (all schedules here do), so the step stays free of host syncs and compiles.
    """

    def init_fn(params):
        leaves, _ = _flatten(params)
        return ScaleByScheduleState(_zero_count(leaves))

    def update_fn(updates, state, params=None):
        del params
        _expect_state(state, ScaleByScheduleState, "scale_by_schedule")
        return _times(updates, schedule(state.count)), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate(learning_rate: float | Schedule) -> GradientTransformation:
    """Multiplies updates by `-learning_rate` (a float, or a schedule of the count)."""
    if callable(learning_rate):
        return scale_by_schedule(lambda count: -learning_rate(count))
    if learning_rate < 0:
        raise ConfigError(f"scale_by_learning_rate: learning rate must be >= 0, got {learning_rate}")
    return scale(-float(learning_rate))


# ---------------------------------------------------------------- optimizers


def adamw(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, mask: Mask | None = None) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay.

    With t = count + 1, g the gradient, p the param and lr = learning_rate(count):

        mu_t = b1 mu_{t-1} + (1 - b1) g
        nu_t = b2 nu_{t-1} + (1 - b2) g^2
        u    = (mu_t / (1 - b1^t)) / (sqrt(nu_t) / sqrt(1 - b2^t) + eps)
        p_t  = p - lr (u + weight_decay * mask * p)

    which is `torch.optim.AdamW`'s rule (its `p *= 1 - lr wd` is the same decay term).

    Args:
      learning_rate: a float, or a schedule of the update count (see module docstring).
      b1, b2: decay rates of the first and second moment estimates.
      eps: added to the denominator for numerical stability.
      weight_decay: decoupled weight decay coefficient.
      mask: which leaves decay (see `add_decayed_weights`), e.g. `default_decay_mask`.

    Returns:
      chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate).
    """
    tx = chain(
        scale_by_adam(b1=b1, b2=b2, eps=eps),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
    return tx._replace(apply=_fused_adamw_apply(tx, learning_rate, b1, b2, eps, weight_decay, mask))


_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _fused_adamw_apply(tx: GradientTransformation, learning_rate, b1, b2, eps, weight_decay, mask) -> Callable:
    """`adamw`'s fast path: torch's fused AdamW kernel on fresh copies of params and moments.

    One fused pass plus three copies (to stay pure) instead of the chain's dozen elementwise
    passes. It keeps the chain's state layout, so the two paths mix freely (checkpoints,
    resume). Used for fp32 leaves on CPU/CUDA with bool (or no) masks; anything else (e.g.
    ZeRO's flat shards with a float mask, or NPU tensors) goes through the chain.
    """
    def apply_fn(grads, state, params, grad_scale=None):
        p, spec = _flatten(params)
        g, _ = _flatten(grads)
        adam, decay_state, lr_state = state
        _expect_state(adam, ScaleByAdamState, "adamw")
        m = [True] * len(p) if mask is None else _resolve_mask(mask, params, "adamw")
        fusable = bool(p) and all(isinstance(x, bool) for x in m) and all(
            x.dtype == torch.float32 and x.device.type in _FUSED_ADAMW_DEVICES for x in [*p, *g])
        if grad_scale is not None:
            g = torch._foreach_mul(g, grad_scale)
        if not fusable:
            updates, state = tx.update(optree.tree_unflatten(spec, g), state, params)
            return apply_updates(params, updates), state
        lr = learning_rate(adam.count) if callable(learning_rate) else float(learning_rate)
        count = adam.count + 1
        steps = [count.to(torch.float32)] * len(p)
        new_p, mu, nu = ([x.clone() for x in leaves] for leaves in (p, _flatten(adam.mu)[0], _flatten(adam.nu)[0]))
        for decays in (True, False):
            idx = [i for i, x in enumerate(m) if x == decays]
            if idx:
                pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
                torch._fused_adamw_(pick(new_p), pick(g), pick(mu), pick(nu), [], pick(steps), lr=lr,
                                    beta1=b1, beta2=b2, weight_decay=weight_decay if decays else 0.0, eps=eps,
                                    amsgrad=False, maximize=False, grad_scale=None, found_inf=None)
        unflat = lambda leaves: optree.tree_unflatten(spec, leaves)  # noqa: E731
        new_lr_state = ScaleByScheduleState(lr_state.count + 1) if isinstance(lr_state, ScaleByScheduleState) else lr_state
        return unflat(new_p), (ScaleByAdamState(count, unflat(mu), unflat(nu)), decay_state, new_lr_state)

    return apply_fn


def sgd(learning_rate: float | Schedule, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0, mask: Mask | None = None) -> GradientTransformation:
    """SGD as `torch.optim.SGD` (dampening 0): coupled L2 weight decay, then momentum.

        g   = grad + weight_decay * mask * p
        buf = momentum buf + g                    (buf_0 = 0, so buf_1 = g)
        p_t = p - lr (g + momentum buf  if nesterov  else  buf)
    """
    if nesterov and momentum <= 0:
        raise ConfigError(f"sgd: nesterov needs momentum > 0, got momentum={momentum}")
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay, mask))
    if momentum:
        parts.append(trace(momentum, nesterov=nesterov))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


# ---------------------------------------------------------------- schedules
#
# A schedule maps the update count to a learning rate. Called with a Python int it returns
# a float computed in double precision (Megatron's numbers exactly); called with a 0-d
# tensor it evaluates the same formula as fp32 tensor ops on that tensor's device.

DECAY_STYLES = ("constant", "linear", "cosine")


def _where(cond, a, b):
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def _as_step(step):
    return step.to(torch.float32) if isinstance(step, torch.Tensor) else float(step)


def _as_result(step, value):
    if isinstance(step, torch.Tensor):
        return torch.as_tensor(value, dtype=torch.float32, device=step.device)
    return float(value)


def constant(value: float) -> Schedule:
    """The same learning rate at every step."""
    return lambda step: _as_result(step, value)


def make_schedule(style: str, *, lr: float, min_lr: float = 0.0, warmup_iters: int | None = None,
                  warmup_fraction: float | None = None, decay_iters: int | None = None) -> Schedule:
    """Megatron's `OptimizerParamScheduler` learning rate, as a pure function of the step.

        step <= warmup:          lr * step / warmup          (only when warmup > 0)
        style == "constant":     lr
        step > decay_iters:      min_lr
        otherwise, with r = (step - warmup) / (decay_iters - warmup):
          "linear":              min_lr + (1 - r) (lr - min_lr)
          "cosine":              min_lr + 0.5 (1 + cos(pi r)) (lr - min_lr)

    `step` is the number of updates applied so far (the first update uses step 0, so lr 0
    under warmup, as in Megatron). `warmup_fraction` gives warmup = fraction * decay_iters,
    as Megatron's `--lr-warmup-fraction` does (not rounded).
    """
    warmup = _warmup_steps(warmup_iters, warmup_fraction, decay_iters)
    _check_schedule(style, lr, min_lr, warmup, decay_iters)

    def schedule(step):
        s = _as_step(step)
        out = lr
        if style != "constant":
            ratio = (s - warmup) / (decay_iters - warmup)
            if isinstance(ratio, torch.Tensor):
                ratio = ratio.clamp(0.0, 1.0)
                coeff = 1.0 - ratio if style == "linear" else 0.5 * (torch.cos(math.pi * ratio) + 1.0)
            else:
                ratio = min(max(ratio, 0.0), 1.0)
                coeff = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
            out = _where(s > decay_iters, min_lr, min_lr + coeff * (lr - min_lr))
        if warmup > 0:
            out = _where(s <= warmup, lr * s / warmup, out)
        return _as_result(step, out)

    return schedule


def _warmup_steps(warmup_iters, warmup_fraction, decay_iters) -> float:
    if warmup_iters is not None and warmup_fraction is not None:
        raise ConfigError(f"schedule: give warmup_iters ({warmup_iters}) or warmup_fraction "
                          f"({warmup_fraction}), not both")
    if warmup_fraction is not None:
        if not 0.0 <= warmup_fraction <= 1.0 or decay_iters is None:
            raise ConfigError(f"schedule: warmup_fraction must be in [0, 1] with decay_iters set, "
                              f"got {warmup_fraction} and decay_iters={decay_iters}")
        return warmup_fraction * decay_iters
    return warmup_iters or 0


def _check_schedule(style, lr, min_lr, warmup, decay_iters) -> None:
    if style not in DECAY_STYLES:
        raise ConfigError(f"schedule: style must be one of {DECAY_STYLES}, got {style!r}")
    if not 0.0 <= min_lr <= lr:
        raise ConfigError(f"schedule: need 0 <= min_lr <= lr, got min_lr={min_lr}, lr={lr}")
    if warmup < 0:
        raise ConfigError(f"schedule: warmup must be >= 0, got {warmup}")
    if style != "constant" and (decay_iters is None or not warmup < decay_iters):
        raise ConfigError(f"schedule: style {style!r} needs decay_iters > warmup, "
                          f"got decay_iters={decay_iters}, warmup={warmup}")


def warmup_cosine(peak_lr: float, warmup_steps: int, decay_steps: int, min_lr: float = 0.0) -> Schedule:
    """Linear warmup to `peak_lr`, cosine decay to `min_lr` at `decay_steps`, then flat."""
    return make_schedule("cosine", lr=peak_lr, min_lr=min_lr, warmup_iters=warmup_steps, decay_iters=decay_steps)


def warmup_linear(peak_lr: float, warmup_steps: int, decay_steps: int, min_lr: float = 0.0) -> Schedule:
    """Linear warmup to `peak_lr`, linear decay to `min_lr` at `decay_steps`, then flat."""
    return make_schedule("linear", lr=peak_lr, min_lr=min_lr, warmup_iters=warmup_steps, decay_iters=decay_steps)
