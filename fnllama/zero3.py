"""ZeRO stage 3: parameters sharded too, gathered one layer at a time in forward and backward.

    rule = zero3.Zero3Rule(lambda mask: optim.adamw(lr, weight_decay=0.1, mask=mask), mesh)
    state = rule.shard_train_state(train.init_state(key, cfg, rule))   # params: shards only
    step = train.make_train_step(cfg, rule, mesh=mesh, loss_fn=rule.loss_fn)
    full_params = rule.gather_params(state.params)                     # for export / eval

The param tree is cut into gather units: unit 0 holds everything outside the layers
(embed, final_norm, lm_head), unit 1 + i holds layers[i]. Each unit has its own flat layout
padded to dp (a `zero.ZeroRule` plan, reused for its bucketed collectives), and rank r keeps
slice r of every unit, so `state.params` is {"rest": Tensor[S_0], "layers": [Tensor[S_i]]}.

`loss_fn` runs `model.loss` on a param tree whose units are all-gathered when first needed:
unit 0 up front, layer i when the model's layer loop reaches it. The gather is an autograd
Function whose backward reduce-scatters the unit's gradient, so grads arrive already summed
over dp and sharded (`reduce_grads` only casts). Saved-tensor hooks replace every gathered
weight autograd would save by a small token and gather the unit again in backward, freeing
it when the unit's backward is done; so at most about one layer's full weights (plus unit 0)
exist at a time, in forward and in backward. `apply` runs the optimizer on the shards; no
all-gather after the update. Activation recompute ("full", "selective") is not supported
with stage 3 (its own saved-tensor hooks would interleave with these).
"""

from __future__ import annotations

import weakref
from typing import Any

import optree
import torch

from fnllama import model, optim, tree, zero
from fnllama.errors import ConfigError

PyTree = Any


def split_units(params: PyTree) -> list[PyTree]:
    """[everything but the layers, layers[0], layers[1], ...]."""
    return [{k: v for k, v in params.items() if k != "layers"}, *params["layers"]]


def join_units(units: list[PyTree]) -> PyTree:
    return {**units[0], "layers": list(units[1:])}


def _sharded(shards: list[torch.Tensor]) -> PyTree:
    return {"rest": shards[0], "layers": list(shards[1:])}


def _unsharded(sharded: PyTree) -> list[torch.Tensor]:
    return [sharded["rest"], *sharded["layers"]]


def _is_sharded(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"rest", "layers"} and isinstance(node["rest"], torch.Tensor)


class _Token:
    """What autograd saves in place of a gathered weight: which unit, and where in it."""

    def __init__(self, unit: int, t: torch.Tensor):
        self.unit, self.shape, self.stride, self.offset = unit, t.shape, t.stride(), t.storage_offset()


class _GatherUnit(torch.autograd.Function):
    """shard [S_u] -> full flat unit [dp * S_u]; backward: reduce-scatter of its gradient."""

    @staticmethod
    def forward(ctx, shard, rule, u):
        ctx.rule, ctx.u, ctx.dtype = rule, u, shard.dtype
        return rule.units[u].gather_flat(shard.detach())

    @staticmethod
    def backward(ctx, g_full):
        rule, u = ctx.rule, ctx.u
        rule.regathered.pop(u, None)          # the unit's backward is over: free its copy
        unit = rule.units[u]
        g_shard = unit.reduce_grads(tree.unflatten(g_full, unit.plan.layout))   # [S_u] fp32
        return g_shard.to(ctx.dtype), None, None


class Zero3Rule:
    """ZeRO stage 3 as a `train.UpdateRule` (use with `loss_fn=rule.loss_fn`).

    Args: as `zero.ZeroRule` (the factory receives {"rest": m0, "layers": [m1, ...]}).
    """

    def __init__(self, optimizer: zero.OptimizerOrFactory, mesh: Any = None, *,
                 bucket_bytes: int = zero.DEFAULT_BUCKET_BYTES, axis: str = "dp",
                 decay_mask: optim.Mask | None = optim.default_decay_mask, gather: str = "auto"):
        self.mesh, self.axis, self.decay_mask = mesh, axis, decay_mask
        self._given = optimizer
        self._unit_args = dict(stage=2, bucket_bytes=bucket_bytes, axis=axis, decay_mask=None, gather=gather)
        self.units: list[zero.ZeroRule] = []
        self.regathered: dict[int, torch.Tensor] = {}
        self.stats = {"gathers": 0, "regathers": 0, "max_regathered": 0}   # units held at once
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._shards: dict[int, torch.Tensor] = {}
        self._optimizer: optim.GradientTransformation | None = None

    @property
    def dp(self) -> int:
        return 1 if self.mesh is None else self.mesh.size(self.axis)

    def psum(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dp == 1 else self.mesh.psum(x, self.axis)

    # -- layout and sharding

    def _bind(self, params: PyTree) -> None:
        """Plans per unit and the optimizer, from the full (structured) params."""
        if self.units:
            return
        for unit in split_units(params):
            rule = zero.ZeroRule(optim.sgd(0.0), self.mesh, **self._unit_args)
            rule._bind(unit)
            self.units.append(rule)
        if isinstance(self._given, optim.GradientTransformation):
            self._optimizer = self._given
        else:
            masks = [zero.decay_multipliers(m, u, r.plan) for m, u, r in
                     zip(split_units(_full_mask(self.decay_mask, params)), split_units(params), self.units)]
            self._optimizer = self._given(_sharded(masks))

    def shard_params(self, params: PyTree) -> PyTree:
        """This rank's fp32 shards {"rest": [S_0], "layers": [[S_i], ...]} of full params."""
        self._bind(params)
        return _sharded([zero.shard_of(u, r.plan, what="params") for u, r in zip(split_units(params), self.units)])

    def gather_params(self, sharded: PyTree) -> PyTree:
        """The full param tree from every rank's shards (views of one buffer per unit)."""
        return join_units([tree.unflatten(r.gather_flat(s), r.plan.layout)
                           for s, r in zip(_unsharded(sharded), self.units)])

    def gather_state(self, opt_state: PyTree) -> PyTree:
        """The logical optimizer state (shaped as `optimizer.init(params)` would make it)."""
        def gather(node):
            if _is_sharded(node):
                return self.gather_params(node)
            return node.clone() if isinstance(node, torch.Tensor) else node
        return optree.tree_map(gather, opt_state, is_leaf=_is_sharded, none_is_leaf=True)

    def shard_state(self, full_opt_state: PyTree) -> PyTree:
        """This rank's shards of a logical optimizer state (from `gather_state`, any dp)."""
        meta = _sharded([torch.empty(u.plan.shard_len, device="meta") for u in self.units])
        nodes, spec = optree.tree_flatten(self._optimizer.init(meta), is_leaf=_is_sharded, none_is_leaf=True)
        try:
            parts = spec.flatten_up_to(full_opt_state)
        except (ValueError, TypeError) as e:
            raise ValueError(f"zero stage 3 shard_state: the optimizer state does not have the "
                             f"structure this optimizer makes: {e}") from None
        out = [self.shard_params(part) if _is_sharded(node)
               else (part.clone() if isinstance(part, torch.Tensor) else part)
               for node, part in zip(nodes, parts)]
        return optree.tree_unflatten(spec, out)

    def shard_train_state(self, state: Any) -> Any:
        """A TrainState from `train.init_state` with its full params replaced by shards."""
        return state._replace(params=self.shard_params(state.params))

    # -- the loss with per-layer gathers

    def loss_fn(self, sharded: PyTree, batch: dict, cfg: Any, *, recompute: str = "none"):
        """`model.loss` on params gathered unit by unit (see the module docstring)."""
        if recompute != "none":
            raise ConfigError(f"zero stage 3: recompute={recompute!r} is not supported, use 'none'")
        shards = _unsharded(sharded)
        rest = self._gather(shards[0], 0)
        params = {**rest, "layers": _LazyLayers(self, shards[1:])}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return model.loss(params, batch, cfg)

    def _gather(self, shard: torch.Tensor, u: int) -> PyTree:
        self.stats["gathers"] += 1
        self.regathered.pop(u, None)          # stale only if a previous backward was abandoned
        full = _GatherUnit.apply(shard, self, u) if shard.requires_grad else self.units[u].gather_flat(shard)
        self._live[u] = full
        self._shards[u] = shard.detach()
        return tree.unflatten(full, self.units[u].plan.layout)

    def _pack(self, t: torch.Tensor) -> Any:
        base = t._base if t._base is not None else t
        for u, full in self._live.items():
            if base is full:
                return _Token(u, t)
        return t

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Token):
            return saved
        full = self.regathered.get(saved.unit)
        if full is None:
            self.stats["regathers"] += 1
            full = self.units[saved.unit].gather_flat(self._shards[saved.unit])
            self.regathered[saved.unit] = full
            self.stats["max_regathered"] = max(self.stats["max_regathered"], len(self.regathered))
        return full.as_strided(saved.shape, saved.stride, saved.offset)

    # -- UpdateRule

    def init(self, params: PyTree) -> PyTree:
        """Optimizer state for this rank's shards; `params` full (init_state) or sharded."""
        if "rest" in params:
            if not self.units:
                raise ValueError("zero stage 3: call rule.init with the full params first")
            return self._optimizer.init(optree.tree_map(lambda t: t.float(), params))
        shards = self.shard_params(params)
        return self._optimizer.init(shards)

    def reduce_grads(self, grads: PyTree) -> PyTree:
        """Already summed over dp and sharded in backward: only made fp32."""
        return optree.tree_map(lambda g: g.float(), grads)

    def global_norm(self, reduced: PyTree) -> torch.Tensor:
        local = sum(torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in optree.tree_leaves(reduced))
        return self.psum(local).sqrt()

    def apply(self, reduced: PyTree, opt_state: PyTree, params: PyTree, *,
              grad_scale: torch.Tensor) -> tuple[PyTree, PyTree]:
        grads = optree.tree_map(lambda g: g * grad_scale, reduced)
        updates, opt_state = self._optimizer.update(grads, opt_state, params)
        new = optim.apply_updates(params, updates)
        for shard, unit in zip(_unsharded(new), self.units):
            unit._zero_padding(shard)
        return new, opt_state


class _LazyLayers:
    """The layer list the model iterates: layer i is gathered when the loop reaches it."""

    def __init__(self, rule: Zero3Rule, shards: list[torch.Tensor]):
        self.rule, self.shards = rule, shards

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self):
        for i, shard in enumerate(self.shards):
            yield self.rule._gather(shard, 1 + i)


def _full_mask(decay_mask: optim.Mask | None, params: PyTree) -> PyTree:
    """The mask as a tree shaped like params (bool leaves; all True for None)."""
    if decay_mask is None:
        return optree.tree_map(lambda _: True, params)
    return decay_mask(params) if callable(decay_mask) else decay_mask
