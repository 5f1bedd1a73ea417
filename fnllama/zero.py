"""ZeRO stages 1 and 2: the optimizer state (and reduced gradients) sharded over `dp`.

    rule = zero.ZeroRule(lambda mask: optim.adamw(lr, weight_decay=0.1, mask=mask), mesh, stage=2)
    state = train.init_state(key, cfg, rule)          # opt_state: this rank's shard only
    step = train.make_train_step(cfg, rule, mesh=mesh)

The flat view (DESIGN.md principle 6). The param tree is laid out, leaf after leaf, in one
fp32 buffer of `padded_total = dp * S` elements (`tree.make_layout(params, pad_to=dp)`; the
tail past `total` is zero padding). dp rank r owns the contiguous slice [r*S, (r+1)*S):

    flat   [ leaf0 | leaf1 | ... | leafN | pad ]          # [dp * S]
    shards [  rank 0  |  rank 1  | ... | rank dp-1 ]       # S = ceil(total / dp) each

Per step, with g the local (unreduced) grad tree and p the replicated fp32 params:

    reduce_grads(g)   -> gs  [S]   sum over dp of this rank's slice of flat(g)
                                   stage 1: all-reduce each bucket, keep this rank's row
                                   stage 2: reduce-scatter each bucket (each rank gets its row)
    global_norm(gs)   -> sqrt(psum_dp |gs|^2)       (the same 0-d value on every rank)
    apply(gs, ...)    -> the optimizer on {"flat": ps} with ps = slice of flat(p) [S], then
                         an all-gather (on gloo: one broadcast per rank) of the updated
                         slices, bucket by bucket, into one new flat buffer whose views are
                         the new param tree.

The optimizer state is `optimizer.init({"flat": ps})`: fp32 moments of S elements each, so
per-rank optimizer bytes = ceil(total / dp) * state tensors * 4 (plus 0-d counters).

Buckets and the memory bound. Bucket k covers shard-local elements [k*n, k*n + n_k) of every
rank's shard at once, i.e. the flat ranges [r*S + k*n, r*S + k*n + n_k) for r < dp, packed
as a [dp, n_k] tensor (n = bucket_bytes / (4 * dp)). Reduce-scattering it leaves row r on
rank r, which is exactly its shard's next n_k elements, and all-gathering row r rebuilds the
bucket on every rank. The bucket is filled straight from the grad leaves (no concatenated
copy of the grads is ever made), so besides the tensors the step must hold anyway (the
grad tree autograd returns, the params, and the new params the pure step returns), ZeRO
allocates only: the grad shard [S], the param shard (a view when the params are the flat
buffer the previous `apply` returned) and its update [S], the optimizer's
per-step temporaries on [S], and one bucket (plus the collective's own copy of it) at a time
-- O(total/dp + bucket), never a second full-size buffer. A 7B model at dp=8 with 64 MiB
buckets: S = 0.84 G elements (3.4 GB per [S] buffer) and 2 x 64 MiB in flight.

Stage 1 vs 2 here. Neither ever holds a full reduced gradient (the reduction goes bucket by
bucket into the [S] shard), so their memory is the same; they differ in traffic: stage 1
all-reduces each bucket (what DDP sends) and keeps its row, stage 2 reduce-scatters it (half
the bytes where the backend has a native reduce-scatter). What neither saves: the train step
builds the whole local grad tree before `reduce_grads` sees it; reducing buckets as backward
produces them would. `fnllama.zero3` does that per layer, with the params sharded too.

Weight decay. The optimizer sees the tree {"flat": Tensor[S]}, so a mask written for the
structured params (e.g. `optim.default_decay_mask`, which exempts ndim <= 1 leaves) cannot
apply there. Pass the optimizer as a factory `optimizer(mask) -> GradientTransformation`;
the rule calls it with {"flat": Tensor[S]} of fp32 0/1 multipliers built from `decay_mask`
over the structured params (padding gets 0). A plain GradientTransformation is used as given.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Union

import optree
import torch

from fnllama import optim, tree
from fnllama.errors import ConfigError
from fnllama.tree import FlatLayout

PyTree = Any
OptimizerOrFactory = Union[optim.GradientTransformation, Callable[[Any], optim.GradientTransformation]]
DEFAULT_BUCKET_BYTES = 64 * 2**20
GATHER_IMPLS = ("auto", "all_gather", "broadcast")
FLAT = "flat"


# ------------------------------------------------------------------ the static plan

@dataclass(frozen=True)
class ShardPlan:
    """Where this rank's shard and each communication bucket sit in the flat buffer."""

    layout: FlatLayout
    dp: int            # ranks on the axis
    rank: int          # this rank's index on the axis
    bucket_len: int    # n: elements per rank per bucket (a bucket is [dp, n])

    @property
    def shard_len(self) -> int:
        return self.layout.padded_total // self.dp           # S

    @property
    def shard_range(self) -> tuple[int, int]:
        return self.rank * self.shard_len, (self.rank + 1) * self.shard_len

    def buckets(self) -> list[tuple[int, int]]:
        """(start, length) of each bucket in shard-local coordinates."""
        s, n = self.shard_len, self.bucket_len
        return [(start, min(n, s - start)) for start in range(0, s, n)]


def make_plan(params: PyTree, *, dp: int, rank: int, bucket_bytes: int) -> ShardPlan:
    layout = tree.make_layout(params, pad_to=dp)
    bucket_len = max(1, bucket_bytes // (4 * dp))
    return ShardPlan(layout, dp, rank, bucket_len)


# ------------------------------------------------------------------ flat ranges of leaves

def read_range(leaves: list[torch.Tensor], layout: FlatLayout, lo: int, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` [m] with flat(leaves)[lo:lo+m], converting dtype; zeros past `layout.total`.

    Touches only the leaves that overlap the range (found by bisection), so a range costs
    O(log leaves + overlapping leaves) and no flat copy of the whole tree is made.
    """
    hi = lo + out.numel()
    i = max(bisect.bisect_right(layout.offsets, lo) - 1, 0)
    while i < len(leaves) and layout.offsets[i] < hi:
        off, size = layout.offsets[i], layout.sizes[i]
        a, b = max(lo, off), min(hi, off + size)
        if a < b:
            out[a - lo:b - lo].copy_(leaves[i].reshape(-1)[a - off:b - off])
        i += 1
    if hi > layout.total:
        out[max(layout.total - lo, 0):].zero_()
    return out


def shard_of(tree_: PyTree, plan: ShardPlan, *, what: str = "tree") -> torch.Tensor:
    """This rank's fp32 slice [S] of flat(tree_) (a new tensor; padding is zero)."""
    leaves = _leaves_like(tree_, plan.layout, what)
    device = leaves[0].device if leaves else "cpu"
    out = torch.empty(plan.shard_len, dtype=torch.float32, device=device)
    return read_range(leaves, plan.layout, plan.shard_range[0], out)


def _leaves_like(tree_: PyTree, layout: FlatLayout, what: str) -> list[torch.Tensor]:
    try:
        leaves = layout.treespec.flatten_up_to(tree_)
    except (ValueError, TypeError) as e:
        raise ValueError(f"zero: {what} does not have the params' structure: {e}") from None
    for path, leaf, shape in zip(layout.paths, leaves, layout.shapes):
        if tuple(leaf.shape) != shape:
            raise ValueError(f"zero: {what} leaf {path!r} has shape {tuple(leaf.shape)}, expected {shape}")
    return leaves


def flat_buffer_of(tree_: PyTree, layout: FlatLayout) -> torch.Tensor | None:
    """The fp32 buffer [padded_total] whose views are `tree_`'s leaves at the layout's offsets
    (as `apply` returns them), or None when the leaves are not laid out that way."""
    try:
        leaves = layout.treespec.flatten_up_to(tree_)
    except (ValueError, TypeError):
        return None
    if not leaves:
        return None
    storage = leaves[0].untyped_storage()
    for leaf, offset, shape in zip(leaves, layout.offsets, layout.shapes):
        if (leaf.dtype != torch.float32 or tuple(leaf.shape) != shape or not leaf.is_contiguous()
                or leaf.untyped_storage().data_ptr() != storage.data_ptr() or leaf.storage_offset() != offset):
            return None
    if storage.nbytes() < layout.padded_total * 4:
        return None
    flat = torch.empty(0, dtype=torch.float32, device=leaves[0].device)
    return flat.set_(storage, 0, (layout.padded_total,))


def decay_multipliers(decay_mask: optim.Mask | None, params: PyTree, plan: ShardPlan) -> torch.Tensor:
    """This rank's slice [S] of the weight-decay mask as fp32 0/1 multipliers (0 on padding).

    Built leaf by leaf over the shard only, never as a full-size fp32 copy of the params.
    """
    leaves = _leaves_like(params, plan.layout, "params")
    device = leaves[0].device if leaves else "cpu"
    if decay_mask is None:
        mask_leaves = [True] * len(leaves)
    else:
        mask = decay_mask(params) if callable(decay_mask) else decay_mask
        mask_leaves = plan.layout.treespec.flatten_up_to(mask)
    as_leaf = [_multiplier(m, p) for m, p in zip(mask_leaves, leaves)]
    out = torch.empty(plan.shard_len, dtype=torch.float32, device=device)
    return read_range(as_leaf, plan.layout, plan.shard_range[0], out)


def _multiplier(m: Any, param: torch.Tensor) -> torch.Tensor:
    """A leaf's multiplier, broadcast (not copied: expand) to the param's shape."""
    value = m.to(torch.float32) if isinstance(m, torch.Tensor) else torch.tensor(float(bool(m)))
    return value.to(param.device).expand(param.shape)


# ------------------------------------------------------------------ the rule

class ZeroRule:
    """ZeRO stage 1 or 2 as a `train.UpdateRule`.

    Args:
      optimizer: a GradientTransformation run on {"flat": shard}, or a factory
        `optimizer(mask) -> GradientTransformation` that receives the flat weight-decay
        multipliers {"flat": Tensor[S]} (see the module docstring).
      mesh: a `fnllama.mesh.Mesh` with axis `axis` (None: a world of one, no collectives).
      stage: 1 (optimizer state sharded) or 2 (gradients reduce-scattered as well).
      bucket_bytes: fp32 bytes per communication bucket (all ranks' rows together).
      axis: the data-parallel mesh axis.
      decay_mask: the structured-params mask handed, flattened, to a factory `optimizer`;
        None decays every element (except padding).
      gather: how updated shards reach every rank: "all_gather", "broadcast" (one broadcast
        per source rank, as torch's ZeroRedundancyOptimizer does) or "auto" (broadcast on
        gloo, whose all-gather measured 1.4-2.7x slower than two broadcasts for an 8 MB
        shard at dp=2 on CPU; all_gather elsewhere). Both are
        exact copies, so the choice never changes a result.
    """

    def __init__(self, optimizer: OptimizerOrFactory, mesh: Any = None, *, stage: int = 1,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, axis: str = "dp",
                 decay_mask: optim.Mask | None = optim.default_decay_mask, gather: str = "auto"):
        if gather not in GATHER_IMPLS:
            raise ConfigError(f"zero: gather={gather!r}, expected one of {GATHER_IMPLS}")
        if stage not in (1, 2):
            raise ConfigError(f"zero: stage={stage!r}, expected 1 or 2 (stage 0 is train.Replicated, "
                              "stage 3 zero3.Zero3Rule; zero.make_rule picks by stage)")
        if not isinstance(bucket_bytes, int) or bucket_bytes < 4:
            raise ConfigError(f"zero: bucket_bytes={bucket_bytes!r}, expected an int >= 4")
        self.stage, self.mesh, self.axis, self.bucket_bytes = stage, mesh, axis, bucket_bytes
        self.decay_mask = decay_mask
        if gather == "auto":
            gather = "broadcast" if mesh is not None and mesh.backend == "gloo" else "all_gather"
        self.gather = gather
        self._given = optimizer
        self._optimizer: optim.GradientTransformation | None = None
        self._plan: ShardPlan | None = None

    # -- mesh

    @property
    def dp(self) -> int:
        return 1 if self.mesh is None else self.mesh.size(self.axis)

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh.rank(self.axis)

    def psum(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dp == 1 else self.mesh.psum(x, self.axis)

    # -- layout

    @property
    def plan(self) -> ShardPlan:
        if self._plan is None:
            raise ValueError("zero: the rule has no layout yet; call rule.init(params) first")
        return self._plan

    def _bind(self, params: PyTree) -> ShardPlan:
        """Make the plan (and the optimizer) from the first tree seen; later trees reuse it."""
        if self._plan is None:
            self._plan = make_plan(params, dp=self.dp, rank=self.dp_rank, bucket_bytes=self.bucket_bytes)
            self._optimizer = self._build_optimizer(params)
        return self._plan

    def _build_optimizer(self, params: PyTree) -> optim.GradientTransformation:
        if isinstance(self._given, optim.GradientTransformation):
            return self._given
        mask = {FLAT: decay_multipliers(self.decay_mask, params, self._plan)}
        return self._given(mask)

    # -- UpdateRule

    def init(self, params: PyTree) -> PyTree:
        """Optimizer state for this rank's shard only (fp32, S elements per state tensor)."""
        plan = self._bind(params)
        return self._optimizer.init({FLAT: shard_of(params, plan, what="params")})

    def reduce_grads(self, grads: PyTree) -> torch.Tensor:
        """This rank's slice [S] of the dp-summed flat gradient, one bucket at a time."""
        plan = self._bind(grads)
        leaves = _leaves_like(grads, plan.layout, "grads")
        device = leaves[0].device if leaves else "cpu"
        shard = torch.empty(plan.shard_len, dtype=torch.float32, device=device)     # [S]
        for start, n in plan.buckets():
            bucket = torch.empty(plan.dp, n, dtype=torch.float32, device=device)     # [dp, n]
            for r in range(plan.dp):
                read_range(leaves, plan.layout, r * plan.shard_len + start, bucket[r])
            shard[start:start + n] = self._reduce_bucket(bucket)                     # [n]
        return shard

    def _reduce_bucket(self, bucket: torch.Tensor) -> torch.Tensor:
        """[dp, n] local rows -> [n]: this rank's row summed over dp."""
        if self.dp == 1:
            return bucket[0]
        if self.stage == 1:
            return self.mesh.psum(bucket, self.axis)[self.dp_rank]
        return self.mesh.psum_scatter(bucket.reshape(-1), self.axis)

    def global_norm(self, reduced: torch.Tensor) -> torch.Tensor:
        """The L2 norm of the whole reduced gradient (identical on every rank)."""
        local = torch.linalg.vector_norm(reduced, dtype=torch.float32).square()
        return self.psum(local).sqrt()

    def apply(self, reduced: torch.Tensor, opt_state: PyTree, params: PyTree, *,
              grad_scale: torch.Tensor) -> tuple[PyTree, PyTree]:
        """Update this rank's shard, then all-gather the new params (views of one flat buffer)."""
        plan = self._bind(params)
        flat = flat_buffer_of(params, plan.layout)           # params from our last all-gather?
        lo, hi = plan.shard_range
        p_shard = shard_of(params, plan, what="params") if flat is None else flat[lo:hi]   # [S]
        g_shard = reduced * grad_scale                                               # [S]
        updates, opt_state = self._optimizer.update({FLAT: g_shard}, opt_state, {FLAT: p_shard})
        new_shard = optim.apply_updates({FLAT: p_shard}, updates)[FLAT]              # [S]
        self._zero_padding(new_shard)
        flat = self.gather_flat(new_shard)                                           # [dp * S]
        return tree.unflatten(flat, plan.layout), opt_state

    def _zero_padding(self, shard: torch.Tensor) -> None:
        """Keep padded elements exactly zero (an update there could be 0/0 with eps=0)."""
        lo, hi = self.plan.shard_range
        if hi > self.plan.layout.total:
            shard[max(self.plan.layout.total - lo, 0):] = 0.0

    def gather_flat(self, shard: torch.Tensor) -> torch.Tensor:
        """All ranks' shards [S] -> the full flat buffer [dp * S], bucket by bucket."""
        plan = self.plan
        if plan.dp == 1:
            return shard.clone()
        flat = torch.empty(plan.layout.padded_total, dtype=shard.dtype, device=shard.device)
        by_rank = flat.view(plan.dp, plan.shard_len)                                 # [dp, S]
        for start, n in plan.buckets():
            piece = shard[start:start + n]                                           # [n]
            if self.gather == "all_gather":
                by_rank[:, start:start + n] = self.mesh.all_gather(piece, self.axis).view(plan.dp, n)
            else:  # non-source ranks send `piece` as a same-shaped buffer to receive into
                for src in range(plan.dp):
                    by_rank[src, start:start + n] = self.mesh.broadcast(piece, self.axis, src=src)
        return flat

    # -- the logical (unsharded) optimizer state, for checkpoints and resharding

    def gather_state(self, opt_state: PyTree) -> PyTree:
        """The full optimizer state, as `optimizer.init(params)` on the structured params
        would shape it (every {"flat": shard} becomes a params-shaped tree). Full size on
        every rank: meant for saving, not for the training loop.
        """
        layout = self.plan.layout

        def gather(node):
            if _is_flat(node):
                return tree.unflatten(self.gather_flat(node[FLAT]), layout)
            return node.clone() if isinstance(node, torch.Tensor) else node
        return optree.tree_map(gather, opt_state, is_leaf=_is_flat, none_is_leaf=True)

    def shard_state(self, full_opt_state: PyTree) -> PyTree:
        """This rank's shard of a logical optimizer state (from `gather_state`, any dp)."""
        plan = self.plan
        template = self._optimizer.init({FLAT: torch.empty(plan.shard_len, device="meta")})
        nodes, spec = optree.tree_flatten(template, is_leaf=_is_flat, none_is_leaf=True)
        try:
            parts = spec.flatten_up_to(full_opt_state)
        except (ValueError, TypeError) as e:
            raise ValueError(f"zero.shard_state: the optimizer state does not have the structure "
                             f"this optimizer makes: {e}") from None
        out = [{FLAT: shard_of(part, plan, what="optimizer state")} if _is_flat(node)
               else (part.clone() if isinstance(part, torch.Tensor) else part)
               for node, part in zip(nodes, parts)]
        return optree.tree_unflatten(spec, out)


def _is_flat(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and FLAT in node and isinstance(node[FLAT], torch.Tensor)


def make_rule(optimizer: OptimizerOrFactory, mesh: Any = None, *, stage: int,
              bucket_bytes: int = DEFAULT_BUCKET_BYTES, axis: str = "dp",
              decay_mask: optim.Mask | None = optim.default_decay_mask, gather: str = "auto"):
    """The update rule for a ZeRO stage: 0 is `train.Replicated`, 1 and 2 are `ZeroRule`, 3 is
    `zero3.Zero3Rule` (which needs `loss_fn=rule.loss_fn` and sharded params, see there)."""
    if stage == 3:
        from fnllama import zero3  # zero3 builds on this module
        return zero3.Zero3Rule(optimizer, mesh, bucket_bytes=bucket_bytes, axis=axis,
                               decay_mask=decay_mask, gather=gather)
    if stage == 0:
        from fnllama import train  # train imports nothing from here; keep the import local
        opt = optimizer if isinstance(optimizer, optim.GradientTransformation) else optimizer(decay_mask)
        return train.Replicated(opt, mesh, axis=axis)
    return ZeroRule(optimizer, mesh, stage=stage, bucket_bytes=bucket_bytes, axis=axis,
                    decay_mask=decay_mask, gather=gather)


def optimizer_state_bytes(opt_state: PyTree) -> int:
    """Bytes of the optimizer state's tensors, 0-d counters excluded."""
    return sum(t.numel() * t.element_size() for t in optree.tree_leaves(opt_state)
               if isinstance(t, torch.Tensor) and t.ndim > 0)
