"""Checkpoints of any pytree of tensors (the whole `TrainState`) with orbax-checkpoint.

A state is saved *by leaf path*: every leaf gets a dotted name ("params.layers.0.attn.wq",
"opt_state.1.mu.embed"; NamedTuple fields by name, list items by index, dict keys as they
are). Tensors go to numpy without loss (bf16/fp8 as their ml_dtypes twins, bit for bit) and are
written by orbax as one flat dict {path: array}; each leaf's dtype, shape and kind is kept in a
JSON item beside them, and so are Python scalars (ints, floats, bools, strs: a data-loader
position, a step counter kept as int). Restore takes a *template* tree (as orbax does): the
template gives the structure back (NamedTuple types included), the checkpoint gives the values.
Template leaves may be meta tensors, so nothing needs allocating twice. Storing leaves by name
rather than a pickled treespec keeps the files readable by any tool and makes a mismatch
(missing leaf, other shape) an error that names the parameter.

Sharded leaves and resharding. `save(..., shards={path: Shard(group, start, total)})` marks
leaves that are a slice of a *logical* flat buffer: the leaf's elements (row-major) are the
buffer's elements [start, start + numel), the buffer has `total` elements, and anything past
`total` is zero padding. ZeRO saves each rank's optimizer shard this way (group
"opt_state.0.mu", start = the rank's offset in the flat layout); a replicated optimizer saves
each moment leaf with its offset in the same layout, so both forms describe one logical state.
`restore(..., shards=...)` asks for slices of the same groups: when the saved part of this rank
has exactly the requested slices it is read as is; otherwise (another world size or ZeRO
stage) this rank reads, one old rank at a time and only the leaves that overlap, the pieces it
needs (orbax partial restore of that rank's `arrays`), so its peak is about its new shard plus
one old rank's shards, never the whole state (except when the saved state is replicated: then
rank 0's full moments are read once). Unsharded leaves (params, step, key, ...) come from this
rank's part, or rank 0's when this rank did not exist in the saved world.

Multi-process runs (torchrun; orbax's own multi-host machinery needs `jax.distributed`, which
fnllama does not start, so every process looks like orbax process 0) write one orbax
`CheckpointManager` directory per rank, and commit a step for the whole world by hand.

On-disk layout::

    <dir>/
      rank_0/                      orbax CheckpointManager root of rank 0
        <step>/                    one orbax step (appears by atomic rename when complete)
          arrays/                  StandardSave of {leaf path: np.ndarray} (OCDBT + zarr)
          meta/metadata            JSON: format, step, rank, world_size, per-leaf kind/dtype/shape
                                   (+ "shard": {group, start, total} for sharded leaves)
          config/metadata          JSON: the run's config dict ({} when none was given)
          _CHECKPOINT_METADATA     orbax's own
        <step>.orbax-checkpoint-tmp   a save in flight (or the leftovers of a killed one)
      rank_1/ ...                  same for each other rank
      committed/<step>.json        the world commit: {"step", "world_size", "time"}

Commit protocol. A rank's part of a step is complete when orbax has renamed its temporary
directory to `rank_<r>/<step>` (orbax's atomic-rename mode on POSIX file systems); that
directory is the rank's marker. Rank 0 writes `committed/<step>.json` (tmp file + os.replace)
once every rank's part exists. Rank 0 checks, without blocking, on every `save()`,
`latest_step()` and `all_steps()` call, and blocks (up to `commit_timeout_s`) in `wait()` and
`close()`; so with async saves a step is committed at the latest by the next save call, and a
kill before that loses it (the previous committed step is still there). Other ranks' `wait()`
blocks until rank 0 has committed their last step. Only committed steps exist for
`latest_step()`, `all_steps()` and `restore()`.

Cleanup. At start each rank deletes everything in its own `rank_<r>/` that is not a committed
step (tmp dirs of killed saves, parts of steps that never committed) and then meets the other
ranks at a barrier (`torch.distributed.barrier()` when a process group exists, or the
`barrier` callable given), so no rank starts saving while another still cleans. Retention
(`max_to_keep`, `keep_period`) is applied by rank 0 to committed steps right after a commit:
it removes the commit file first (so the step disappears atomically), then the step's
directories on every rank (the file system is shared by assumption: rank 0 reads the others'
directories to commit).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable, NamedTuple

import numpy as np
import optree
import torch

from fnllama.errors import CheckpointError

PyTree = Any

FORMAT = "fnllama-checkpoint/1"
_SCALAR_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}
_SPECIAL_DTYPES = {  # torch dtypes numpy lacks: same bits through an integer view
    torch.bfloat16: ("bfloat16", torch.uint16),
    torch.float8_e4m3fn: ("float8_e4m3fn", torch.uint8),
    torch.float8_e5m2: ("float8_e5m2", torch.uint8),
}


# ----------------------------------------------------------------------------------- leaves


class Shard(NamedTuple):
    """A leaf that is the slice [start, start + numel) of the logical flat buffer `group`.

    The buffer has `total` elements; positions at or past `total` are zero padding.
    """
    group: str
    start: int
    total: int


def _entry_name(entry: Any) -> str:
    """One path component: NamedTuple/dataclass fields by name, the rest by key or index."""
    field = getattr(entry, "field", None)
    return str(field) if isinstance(field, str) else str(entry.entry)


def leaf_paths(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """(dotted paths, leaves, treespec) of `tree`; paths must be unique."""
    accessors, leaves, treespec = optree.tree_flatten_with_accessor(tree)
    paths = [".".join(_entry_name(e) for e in acc) for acc in accessors]
    if len(set(paths)) != len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})
        raise CheckpointError(f"leaf paths are not unique (a dict key with a '.'?): {dup}")
    return paths, leaves, treespec


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of `t` with the same bits (bf16 and fp8 as ml_dtypes); never a view of `t`."""
    t = t.detach()
    special = _SPECIAL_DTYPES.get(t.dtype)
    if special is not None:
        import ml_dtypes

        name, int_dtype = special
        arr = t.cpu().view(int_dtype).numpy().view(getattr(ml_dtypes, name))
    else:
        arr = t.cpu().numpy()
    # A copy, so later in-place updates of `t` cannot reach an async save. np.array (not
    # ascontiguousarray) keeps 0-d arrays 0-d.
    return np.array(arr, copy=True, order="C")


def numpy_to_tensor(arr: np.ndarray, dtype: torch.dtype, device: Any = None) -> torch.Tensor:
    """The tensor of `dtype` whose bits are `arr` (inverse of `tensor_to_numpy`)."""
    special = _SPECIAL_DTYPES.get(dtype)
    arr = np.array(arr, copy=True)  # writable and owned: torch.from_numpy shares memory
    if special is not None:
        _, int_dtype = special
        int_np = {torch.uint16: np.uint16, torch.uint8: np.uint8}[int_dtype]
        t = torch.from_numpy(arr.view(int_np)).view(dtype)
    else:
        t = torch.from_numpy(arr)
    return t.to(device) if device is not None else t


def _leaf_meta(path: str, leaf: Any) -> dict:
    if isinstance(leaf, torch.Tensor):
        return {"kind": "tensor", "dtype": _dtype_name(leaf.dtype), "shape": list(leaf.shape)}
    kind = _SCALAR_KINDS.get(type(leaf))
    if kind is None:
        raise CheckpointError(
            f"leaf {path!r} is a {type(leaf).__name__}; a checkpoint holds torch tensors and "
            f"Python bool/int/float/str leaves")
    return {"kind": kind, "value": leaf}


def encode(state: PyTree) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """({path: numpy copy} of non-empty tensors, {path: leaf metadata}) of `state`."""
    paths, leaves, _ = leaf_paths(state)
    arrays, metas = {}, {}
    for path, leaf in zip(paths, leaves):
        metas[path] = _leaf_meta(path, leaf)
        if isinstance(leaf, torch.Tensor) and leaf.numel() > 0:  # orbax refuses empty arrays
            arrays[path] = tensor_to_numpy(leaf)
    return arrays, metas


def check_template(metas: dict[str, dict], target: PyTree, where: str) -> None:
    """Raise one CheckpointError listing every way `target` does not fit the saved leaves."""
    paths, leaves, _ = leaf_paths(target)
    problems = template_problems(metas, paths, leaves)
    if problems:
        raise CheckpointError(f"checkpoint {where} does not fit the template: " + "; ".join(problems))


def template_problems(metas: dict[str, dict], paths: list[str], leaves: list[Any]) -> list[str]:
    """Every way the template leaves (`paths`, `leaves`) do not fit the saved `metas`."""
    saved, wanted = set(metas), set(paths)
    problems = []
    if wanted - saved:
        problems.append(f"missing from the checkpoint: {sorted(wanted - saved)}")
    if saved - wanted:
        problems.append(f"unexpected in the checkpoint (not in the template): {sorted(saved - wanted)}")
    for path, leaf in zip(paths, leaves):
        meta = metas.get(path)
        if meta is None:
            continue
        want = _leaf_meta(path, leaf)
        if want["kind"] != meta["kind"]:
            problems.append(f"{path}: saved a {meta['kind']}, template has a {want['kind']}")
        elif meta["kind"] == "tensor" and meta["shape"] != want["shape"]:
            problems.append(f"{path}: saved shape {tuple(meta['shape'])}, template shape {tuple(want['shape'])}")
        elif meta["kind"] == "tensor" and meta["dtype"] != want["dtype"]:
            problems.append(f"{path}: saved dtype {meta['dtype']}, template dtype {want['dtype']}")
    return problems


def decode(arrays: dict[str, np.ndarray], metas: dict[str, dict], device: Any = None) -> dict[str, Any]:
    """{path: leaf} from what `encode` wrote (tensors on `device`, default CPU)."""
    out = {}
    for path, meta in metas.items():
        if meta["kind"] != "tensor":
            out[path] = meta["value"]
            continue
        dtype = getattr(torch, meta["dtype"])
        if path in arrays:
            out[path] = numpy_to_tensor(arrays[path], dtype, device)
        else:  # empty tensor: only its shape was saved
            out[path] = torch.empty(meta["shape"], dtype=dtype, device=device)
    return out


# ------------------------------------------------------------------------------ file system


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _step_dirs(rank_dir: str) -> dict[int, str]:
    """{step: path} of the complete (renamed) orbax steps under `rank_dir`."""
    out = {}
    for name in os.listdir(rank_dir) if os.path.isdir(rank_dir) else ():
        if name.isdigit() and os.path.isdir(os.path.join(rank_dir, name)):
            out[int(name)] = os.path.join(rank_dir, name)
    return out


def committed_steps(directory: str) -> list[int]:
    """The world-committed steps of the checkpoint `directory`, oldest first."""
    cdir = os.path.join(directory, "committed")
    names = os.listdir(cdir) if os.path.isdir(cdir) else ()
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _rmtree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _np_dtype(dtype_name: str) -> np.dtype:
    return tensor_to_numpy(torch.empty(0, dtype=getattr(torch, dtype_name))).dtype


def _default_barrier(world_size: int) -> Callable[[], None] | None:
    if world_size == 1:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.barrier
    raise ValueError(
        f"Checkpointer with world_size={world_size} needs a barrier: initialise "
        f"torch.distributed first or pass barrier=")


# ------------------------------------------------------------------------------ manager


class Checkpointer:
    """Save every `save_interval` steps, keep the newest `max_to_keep`, commit for the world.

    Args:
      directory: the checkpoint root (see the module docstring for the layout).
      save_interval: `save(step, ...)` writes only when `step % save_interval == 0` (or force).
      max_to_keep: committed steps kept (newest first); None keeps all.
      keep_period: steps that are multiples of it are kept forever besides the newest ones.
      async_save: write in orbax's background thread; `save()` returns after copying the
        tensors to host memory, so the caller may change them at once.
      rank, world_size: this process in the world (torch.distributed's numbering).
      commit_timeout_s: how long `wait()` waits for the other ranks' parts.
      barrier: called once after start-up cleanup when world_size > 1; default
        `torch.distributed.barrier` (a process group must exist then).
      read_only: only read (restore, list steps): the directory must exist, nothing is
        created or cleaned up (safe next to a run that is writing), no barrier; `save` raises.
    """

    def __init__(self, directory: str | os.PathLike, *, save_interval: int = 1,
                 max_to_keep: int | None = None, keep_period: int | None = None,
                 async_save: bool = True, rank: int = 0, world_size: int = 1,
                 commit_timeout_s: float = 600.0, barrier: Callable[[], None] | None = None,
                 read_only: bool = False):
        if save_interval < 1 or (max_to_keep is not None and max_to_keep < 1) or (
                keep_period is not None and keep_period < 1):
            raise ValueError(f"save_interval={save_interval}, max_to_keep={max_to_keep}, "
                             f"keep_period={keep_period}: each must be >= 1 (or None)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in a world of {world_size}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_interval, self.max_to_keep, self.keep_period = save_interval, max_to_keep, keep_period
        self.rank, self.world_size, self.commit_timeout_s = rank, world_size, commit_timeout_s
        self.rank_dir = self._rank_dir(rank)
        self.commit_dir = os.path.join(self.directory, "committed")
        self.read_only = read_only
        self._pending: list[int] = []  # saved by this process, not yet seen committed
        self._closed = False
        if read_only:
            if not os.path.isdir(self.directory):
                raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
            self._manager = None
            return
        for path in (self.rank_dir, self.commit_dir):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create checkpoint directory {path}: {e.strerror or e}") from e
        self._cleanup()
        barrier = barrier or _default_barrier(world_size)
        if barrier is not None:
            barrier()
        self._manager = self._make_manager(async_save)

    def _rank_dir(self, rank: int) -> str:
        return os.path.join(self.directory, f"rank_{rank}")

    def _make_manager(self, async_save: bool):
        import orbax.checkpoint as ocp  # slow import (~1 s): only when a Checkpointer is made

        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: only committed steps may be deleted
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=False,
            # Directories made inside save(): a failure raises there, and no background
            # thread is left waiting (until orbax's timeout) for a directory that never came.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        return ocp.CheckpointManager(self.rank_dir, options=options)

    def _cleanup(self) -> None:
        """Delete this rank's tmp dirs and uncommitted steps (leftovers of a killed run)."""
        committed = set(committed_steps(self.directory))
        for name in os.listdir(self.rank_dir):
            head = name.split(".")[0]
            if head.isdigit() and not (name == head and int(head) in committed):
                _rmtree(os.path.join(self.rank_dir, name))
        if self.rank == 0:
            for name in os.listdir(self.commit_dir):
                if ".tmp." in name:
                    _rmtree(os.path.join(self.commit_dir, name))

    # -- saving ------------------------------------------------------------------------

    def save(self, step: int, state: PyTree, config: dict | None = None, *, force: bool = False,
             shards: dict[str, Shard] | None = None) -> bool:
        """Start saving `state` (and the JSON-able `config`) as `step`; True if a save started.

        Nothing is saved when `step % save_interval != 0` (unless `force`) or when `step` is
        already committed. `shards` marks leaves (by path) that are slices of logical flat
        buffers, so that another world size can restore them (module docstring). Raises
        CheckpointError when the write cannot start or when an earlier async save failed;
        `state` is never modified.
        """
        import orbax.checkpoint as ocp

        if self.read_only:
            raise CheckpointError(f"checkpoint {self.directory} was opened read-only")
        step = int(step)
        if not force and step % self.save_interval:
            return False
        self._try_commit(block=False)
        committed = committed_steps(self.directory)
        if step in committed:
            return False
        if committed and step < committed[-1]:
            raise CheckpointError(
                f"step {step} is older than the newest committed step {committed[-1]} in "
                f"{self.directory}: resume from that step or save to another directory")
        self._pending = [s for s in self._pending if not committed or s > committed[-1]]
        if self._pending and step <= self._pending[-1]:
            raise CheckpointError(f"save step {step} after step {self._pending[-1]}: steps must increase")
        try:
            config_json = json.loads(json.dumps(config or {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the config saved with step {step} is not JSON: {e}") from e
        arrays, metas = encode(state)
        _mark_shards(metas, shards or {}, step)
        meta = {"format": FORMAT, "step": step, "rank": self.rank, "world_size": self.world_size,
                "leaves": metas}
        items = {"meta": ocp.args.JsonSave(meta), "config": ocp.args.JsonSave(config_json)}
        if arrays:
            items["arrays"] = ocp.args.StandardSave(arrays)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            self._forget_failed()
            raise CheckpointError(f"saving step {step} to {self.rank_dir} failed: "
                                  f"{type(e).__name__}: {e}") from e
        self._pending.append(step)
        self._try_commit(block=False)
        return True

    def _forget_failed(self) -> None:
        """After an orbax error: stop waiting for steps whose part here was never written."""
        self._pending = [s for s in self._pending if os.path.isdir(os.path.join(self.rank_dir, str(s)))]

    def _try_commit(self, *, block: bool) -> None:
        """Rank 0: commit pending steps, oldest first, whose parts all exist."""
        if self.rank != 0:
            return
        deadline = time.monotonic() + self.commit_timeout_s
        while self._pending:
            step = self._pending[0]
            missing = [r for r in range(self.world_size)
                       if not os.path.isdir(os.path.join(self._rank_dir(r), str(step)))]
            if not missing:
                record = {"step": step, "world_size": self.world_size, "time": time.time()}
                _write_json_atomic(os.path.join(self.commit_dir, f"{step}.json"), record)
                self._pending.pop(0)
                self._apply_retention()
            elif not block:
                return
            elif time.monotonic() > deadline:
                self._pending.pop(0)
                raise CheckpointError(
                    f"step {step} not committed: no complete part from rank(s) {missing} after "
                    f"{self.commit_timeout_s:g} s (expected {self._rank_dir(missing[0])}/{step})")
            else:
                time.sleep(0.02)

    def _apply_retention(self) -> None:
        if self.max_to_keep is None:
            return
        steps = committed_steps(self.directory)
        for step in steps[:-self.max_to_keep]:
            if self.keep_period and step % self.keep_period == 0:
                continue
            commit_file = os.path.join(self.commit_dir, f"{step}.json")
            with open(commit_file) as f:
                world_size = json.load(f)["world_size"]
            os.remove(commit_file)  # first: the step disappears at once
            for rank in range(world_size):
                _rmtree(os.path.join(self._rank_dir(rank), str(step)))

    def wait(self) -> None:
        """Block until this process's saves are written and committed for the whole world."""
        if self._manager is None:  # read-only
            return
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            self._forget_failed()
            raise CheckpointError(f"saving to {self.rank_dir} failed: {type(e).__name__}: {e}") from e
        if self.rank == 0:
            self._try_commit(block=True)
            return
        deadline = time.monotonic() + self.commit_timeout_s
        while self._pending:
            steps = committed_steps(self.directory)
            if steps and steps[-1] >= self._pending[-1]:
                self._pending.clear()
            elif time.monotonic() > deadline:
                step = self._pending.pop()
                self._pending.clear()
                raise CheckpointError(f"step {step} was not committed by rank 0 within "
                                      f"{self.commit_timeout_s:g} s ({self.commit_dir})")
            else:
                time.sleep(0.02)

    def close(self) -> None:
        """`wait()`, then release orbax's threads. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._manager is None:
            return
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first."""
        if not self.read_only:
            self._try_commit(block=False)
        return committed_steps(self.directory)

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target: PyTree | None = None, step: int | None = None, *,
                device: Any = None, shards: dict[str, Shard] | None = None,
                partial: bool = False) -> tuple[PyTree, dict]:
        """(state, config) of `step` (default: the latest committed) for this rank.

        `target` is a template tree (tensors may be on the meta device): the result has its
        structure, and tensors of the saved dtype and shape on `device` (default: the template
        leaf's device, CPU for meta). With `target=None` the state is a flat {path: leaf} of
        this rank's part (rank 0's when this rank was not in the saved world). `shards` gives,
        for template paths, the slice of a logical flat buffer wanted here (as in `save`);
        they are assembled from whichever saved parts hold them, so a state saved by another
        world size or ZeRO stage restores. `partial=True` reads only the template's leaves and
        ignores the other saved ones (e.g. just the params). Raises CheckpointError for a missing step, a
        template that does not fit (naming every path and both shapes) or an unreadable item
        (naming the step directory and item).
        """
        step = self._committed_step(step)
        world = self._saved_world(step)
        src = self.rank if self.rank < world else 0
        step_dir = self._part_dir(src, step)
        metas = self._read_meta(step_dir)
        config = self._read_json(step_dir, "config")
        if target is None:
            return decode(self._read_arrays(step_dir, metas), metas), config
        paths, leaves, _ = leaf_paths(target)
        if partial:
            metas = {p: m for p, m in metas.items() if p in set(paths)}
        shards = {p: Shard(*shards[p]) for p in paths if shards and p in shards}
        if _reads_directly(metas, shards, paths, leaves, same_part=src == self.rank):
            check_template(metas, target, step_dir)
            flat = decode(self._read_arrays(step_dir, metas), metas)
        else:
            flat = self._reshard(step, world, step_dir, metas, paths, leaves, shards)
        return _rebuild(flat, target, device), config

    def leaf_metadata(self, step: int | None = None) -> dict[str, dict]:
        """{path: kind/dtype/shape (and shard)} of this rank's saved part of `step` (default:
        the latest committed); reads only JSON."""
        step = self._committed_step(step)
        world = self._saved_world(step)
        return self._read_meta(self._part_dir(self.rank if self.rank < world else 0, step))

    def saved_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (default: the latest committed); reads only JSON."""
        step = self._committed_step(step)
        return self._read_json(self._part_dir(0, step), "config")

    def _committed_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None and not steps:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise CheckpointError(f"step {step} is not a committed checkpoint in {self.directory} "
                                  f"(committed: {steps})")
        return step

    def _saved_world(self, step: int) -> int:
        path = os.path.join(self.commit_dir, f"{step}.json")
        try:
            with open(path) as f:
                return int(json.load(f)["world_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read the commit record {path}: {e}") from e

    def _part_dir(self, rank: int, step: int) -> str:
        path = os.path.join(self._rank_dir(rank), str(step))
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} does not exist: rank {rank}'s part of committed step {step} is missing")
        return path

    def _read_json(self, step_dir: str, item: str) -> Any:
        try:
            with open(os.path.join(step_dir, item, "metadata")) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read item {item!r} of checkpoint {step_dir}: "
                                  f"{type(e).__name__}: {e}") from e

    def _read_meta(self, step_dir: str) -> dict[str, dict]:
        meta = self._read_json(step_dir, "meta")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "leaves" not in meta:
            raise CheckpointError(f"{step_dir}/meta is not a {FORMAT} metadata item")
        return meta["leaves"]

    def _read_arrays(self, step_dir: str, metas: dict[str, dict]) -> dict[str, np.ndarray]:
        """The non-empty tensors among `metas` from `step_dir/arrays` (only those: orbax's
        partial restore), checked against their metadata."""
        import orbax.checkpoint as ocp

        template = {p: np.empty(m["shape"], _np_dtype(m["dtype"])) for p, m in metas.items()
                    if m["kind"] == "tensor" and int(np.prod(m["shape"])) > 0}
        if not template:
            return {}
        args = ocp.args.PyTreeRestore(
            item=template, restore_args={p: ocp.RestoreArgs(restore_type=np.ndarray) for p in template},
            partial_restore=True)
        try:
            with ocp.PyTreeCheckpointer() as reader:
                arrays = reader.restore(os.path.join(step_dir, "arrays"), args=args)
        except Exception as e:
            raise CheckpointError(f"cannot read item 'arrays' of checkpoint {step_dir}: "
                                  f"{type(e).__name__}: {e}") from e
        _check_arrays(arrays, template, step_dir)
        return arrays

    def _reshard(self, step: int, world: int, step_dir: str, metas: dict[str, dict], paths: list[str],
                 leaves: list[Any], shards: dict[str, Shard]) -> dict[str, Any]:
        """Unsharded leaves from `step_dir`, sharded ones assembled from every saved rank."""
        plain = {p: m for p, m in metas.items() if "shard" not in m}
        tpl = [(p, l) for p, l in zip(paths, leaves) if p not in shards]
        problems = template_problems(plain, [p for p, _ in tpl], [l for _, l in tpl])
        problems += _shard_problems(metas, shards, dict(zip(paths, leaves)))
        if problems:
            raise CheckpointError(f"checkpoint {step_dir} does not fit the template: " + "; ".join(problems))
        flat = decode(self._read_arrays(step_dir, plain), plain)
        flat.update(self._assemble(step, world, shards, dict(zip(paths, leaves))))
        return flat

    def _assemble(self, step: int, world: int, shards: dict[str, Shard],
                  leaves: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each wanted slice, copied piece by piece from the saved ranks that hold it.

        Old ranks are read one at a time, each only for the leaves that overlap what is
        still missing; positions past a group's total are padding and stay zero.
        """
        out = {p: torch.zeros(leaves[p].numel(), dtype=leaves[p].dtype) for p in shards}
        todo = {p: [(s.start, min(s.start + out[p].numel(), s.total))] for p, s in shards.items()}
        for rank in range(world):
            if not any(todo.values()):
                break
            rank_dir = self._part_dir(rank, step)
            saved = self._read_meta(rank_dir)
            copies = _overlaps(saved, shards, todo)
            if not copies:
                continue
            needed = {sp: saved[sp] for sp in copies}
            pieces = decode(self._read_arrays(rank_dir, needed), needed)
            for sp, moves in copies.items():
                src = pieces.pop(sp).reshape(-1)
                for tp, a, b in moves:
                    lo, start = saved[sp]["shard"]["start"], shards[tp].start
                    out[tp][a - start:b - start] = src[a - lo:b - lo]
                    todo[tp] = _subtract(todo[tp], a, b)
                del src
        missing = {p: ivs for p, ivs in todo.items() if ivs}
        if missing:
            raise CheckpointError(f"step {step} in {self.directory} does not hold every element of "
                                  f"the sharded leaves: missing flat ranges {missing}")
        return {p: t.view(leaves[p].shape) for p, t in out.items()}


def _mark_shards(metas: dict[str, dict], shards: dict[str, Shard], step: int) -> None:
    for path, spec in shards.items():
        meta = metas.get(path)
        if meta is None or meta["kind"] != "tensor":
            raise CheckpointError(f"save step {step}: shards names {path!r}, which is not a tensor leaf of the state")
        group, start, total = spec
        meta["shard"] = {"group": str(group), "start": int(start), "total": int(total)}


def _reads_directly(metas: dict[str, dict], shards: dict[str, Shard], paths: list[str],
                    leaves: list[Any], *, same_part: bool) -> bool:
    """True when this part holds exactly the wanted slices (or nothing is sharded)."""
    saved_sharded = {p for p, m in metas.items() if "shard" in m}
    if not shards or not saved_sharded:
        return True
    if not same_part or saved_sharded != set(shards):
        return False
    by_path = dict(zip(paths, leaves))
    return all(metas[p]["shard"] == dict(s._asdict()) and metas[p]["shape"] == list(by_path[p].shape)
               for p, s in shards.items())


def _shard_problems(metas: dict[str, dict], shards: dict[str, Shard], leaves: dict[str, Any]) -> list[str]:
    groups = {m["shard"]["group"]: (m["shard"]["total"], m["dtype"]) for m in metas.values() if "shard" in m}
    problems, wanted = [], set()
    for path, spec in shards.items():
        if spec.group in wanted:  # one report per group
            continue
        wanted.add(spec.group)
        leaf = leaves[path]
        if spec.group not in groups:
            problems.append(f"{path}: sharded group {spec.group!r} not in the checkpoint (saved: {sorted(groups)})")
            continue
        total, dtype = groups[spec.group]
        if total != spec.total:
            problems.append(f"{spec.group}: saved {total} elements, template {spec.total}")
        elif dtype != _dtype_name(leaf.dtype):
            problems.append(f"{spec.group}: saved dtype {dtype}, template dtype {_dtype_name(leaf.dtype)}")
    if set(groups) - wanted:
        problems.append(f"sharded groups in the checkpoint but not in the template: {sorted(set(groups) - wanted)}")
    return problems


def _overlaps(saved: dict[str, dict], shards: dict[str, Shard],
              todo: dict[str, list[tuple[int, int]]]) -> dict[str, list[tuple[str, int, int]]]:
    """{saved path: [(template path, a, b)]}: flat ranges [a, b) still missing that it holds."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for sp, meta in saved.items():
        info = meta.get("shard")
        if info is None:
            continue
        lo, hi = info["start"], info["start"] + int(np.prod(meta["shape"]))
        for tp, ranges in todo.items():
            if shards[tp].group != info["group"]:
                continue
            for a, b in ranges:
                if max(a, lo) < min(b, hi):
                    out.setdefault(sp, []).append((tp, max(a, lo), min(b, hi)))
    return out


def _subtract(ranges: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    out = []
    for lo, hi in ranges:
        out += [r for r in ((lo, min(hi, a)), (max(lo, b), hi)) if r[0] < r[1]]
    return out


def _check_arrays(arrays: Any, template: dict[str, np.ndarray], step_dir: str) -> None:
    """The arrays item must hold exactly the leaves the metadata promises."""
    if not isinstance(arrays, dict) or set(arrays) != set(template):
        raise CheckpointError(f"{step_dir}/arrays does not hold the leaves its metadata lists")
    for path, want in template.items():
        got = arrays[path]
        if not isinstance(got, np.ndarray) or got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"{step_dir}/arrays: {path} is {getattr(got, 'dtype', type(got).__name__)}"
                f"{tuple(getattr(got, 'shape', ()))}, metadata says {want.dtype}{want.shape}")


def _rebuild(flat: dict[str, Any], target: PyTree, device: Any) -> PyTree:
    paths, leaves, treespec = leaf_paths(target)
    out = []
    for path, leaf in zip(paths, leaves):
        value = flat[path]
        if isinstance(value, torch.Tensor):
            dev = device if device is not None else (
                "cpu" if leaf.device.type == "meta" else leaf.device)
            value = value.to(dev)
        out.append(value)
    return optree.tree_unflatten(treespec, out)
