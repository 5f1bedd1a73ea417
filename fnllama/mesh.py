"""A device mesh with named axes and JAX-named collectives over torch.distributed.

`Mesh.create({"dp": 8})` joins (or creates) the process group from torchrun's
environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or, when
those are absent, makes a real one-process gloo/nccl/hccl group, so a world of one runs
the same code path as a world of 64. Code names axes ("dp", later "tp"), never ranks.

The collectives are functional: they return new tensors and leave their inputs alone.
They are not differentiable (they move values such as gradients, not traced activations).

    psum(x, axis)           sum over the axis                      (all-reduce)
    pmean(x, axis)          mean over the axis
    all_gather(x, axis, d)  concatenate along tensor dim d         (all-gather)
    psum_scatter(x, axis)   sum, then keep this rank's dim-0 block (reduce-scatter)
    broadcast(x, axis, s)   the value held by axis index s
    barrier(axis)           wait for every rank on the axis

A failed collective (a peer died, or stalled past `timeout_s`) raises `CollectiveError`
naming the collective, the axis and this rank, instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fnllama import device as devices
from fnllama.errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0
REDUCE_SCATTER_IMPLS = ("auto", "native", "allreduce")
_LOW_PRECISION = (torch.bfloat16, torch.float16)

# torch >= 2.13 names these *_single and deprecates the *_tensor spellings.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer died, stalled past the timeout, or broke."""


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 0 of `x` up to a multiple of `multiple` (returns `x` itself if it fits).

    Use it before `psum_scatter` when the length does not divide the axis size; the
    padding sums to zero, so the real entries are unchanged.
    """
    if multiple < 1:
        raise ValueError(f"pad_to_multiple: multiple={multiple}, expected >= 1")
    n = x.shape[0]
    padded = -(-n // multiple) * multiple
    if padded == n:
        return x
    pad = x.new_zeros((padded - n, *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def _resolve_axes(axes: Mapping[str, int] | None, world_size: int) -> dict[str, int]:
    """Axis sizes that multiply to the world size; one size may be -1 ("the rest")."""
    axes = {"dp": -1} if axes is None else dict(axes)
    if not axes:
        raise ConfigError("mesh axes: expected at least one axis, e.g. {'dp': -1}")
    for name, size in axes.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"mesh axes {axes}: axis names must be non-empty strings")
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"mesh axes {axes}: size of '{name}' must be an int >= 1 or -1")
    inferred = [name for name, size in axes.items() if size == -1]
    if len(inferred) > 1:
        raise ConfigError(f"mesh axes {axes}: at most one axis may be -1, found {inferred}")
    known = math.prod(size for size in axes.values() if size != -1)
    if inferred and world_size % known == 0:
        axes[inferred[0]] = world_size // known
    if math.prod(axes.values()) != world_size:
        raise ConfigError(
            f"mesh axes {axes} multiply to {math.prod(axes.values())}, "
            f"but the world has {world_size} processes (WORLD_SIZE)"
        )
    return axes


def _init_process_group(backend: str, timeout: datetime.timedelta) -> bool:
    """Join torchrun's group, or make a one-process one; False if one already exists."""
    if dist.is_initialized():
        return False
    env = os.environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        # A world of one is a real process group: callers never branch on it.
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        return True
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise ConfigError(
            f"torchrun environment incomplete: {', '.join(missing)} unset "
            "(launch with torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
        )
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    return True


class Mesh:
    """Processes arranged on named axes, with collectives over one axis at a time.

    Build it with `Mesh.create`; use it as a context manager or call `destroy()`.
    """

    def __init__(
        self,
        device_mesh: DeviceMesh,
        *,
        device: torch.device,
        backend: str,
        timeout_s: float,
        reduce_scatter: str = "auto",
        owns_process_group: bool = False,
    ):
        if reduce_scatter not in REDUCE_SCATTER_IMPLS:
            raise ConfigError(f"reduce_scatter={reduce_scatter!r}: expected one of {REDUCE_SCATTER_IMPLS}")
        self.device_mesh = device_mesh
        self.device = device
        self.backend = backend
        self.timeout_s = timeout_s
        self.reduce_scatter = reduce_scatter
        self._owns_process_group = owns_process_group
        self._destroyed = False

    @classmethod
    def create(
        cls,
        axes: Mapping[str, int] | None = None,
        *,
        device_type: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        reduce_scatter: str = "auto",
    ) -> Mesh:
        """Join (or create) the process group and lay its ranks out on named axes.

        Args:
            axes: axis name -> size, in major-to-minor order (rank = dp_index * tp + tp_index
                for {"dp": .., "tp": ..}). One size may be -1 for "whatever is left".
                Default {"dp": world_size}.
            device_type: "npu", "cuda" or "cpu"; default: what `fnllama.device` finds.
            timeout_s: how long any collective may wait for its peers before failing.
            reduce_scatter: "native" (the backend's reduce-scatter), "allreduce" (the exact
                fallback: all-reduce, then keep this rank's slice) or "auto" (native, falling
                back when the backend says it lacks reduce-scatter).
        """
        kind = devices.device_type() if device_type is None else device_type
        backend = devices.backend(kind)
        timeout = datetime.timedelta(seconds=timeout_s)
        device = devices.set_device(devices.local_device(kind))
        owns = _init_process_group(backend, timeout)
        try:
            sizes = _resolve_axes(axes, dist.get_world_size())
            names = tuple(sizes)
            device_mesh = init_device_mesh(kind, tuple(sizes.values()), mesh_dim_names=names)
            for name in names:  # subgroups are made with torch's default timeout (30 min)
                group = device_mesh.get_group(name)
                if hasattr(group, "set_timeout"):  # older torch lacks it: default timeout
                    group.set_timeout(timeout)
        except BaseException:
            if owns:
                dist.destroy_process_group()
            raise
        return cls(
            device_mesh,
            device=device,
            backend=backend,
            timeout_s=timeout_s,
            reduce_scatter=reduce_scatter,
            owns_process_group=owns,
        )

    # ----------------------------------------------------------------- layout

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(self.device_mesh.mesh_dim_names)

    @property
    def shape(self) -> dict[str, int]:
        """Axis name -> size, e.g. {"dp": 4, "tp": 2}."""
        return {name: self.device_mesh.size(i) for i, name in enumerate(self.axis_names)}

    @property
    def world_size(self) -> int:
        return self.device_mesh.size()

    @property
    def device_type(self) -> str:
        return self.device.type

    def size(self, axis: str | None = None) -> int:
        """Number of ranks along `axis` (the world size when None)."""
        if axis is None:
            return self.world_size
        return self.device_mesh.size(self._axis_index(axis))

    def rank(self, axis: str | None = None) -> int:
        """This process's index along `axis` (e.g. its dp_rank); its global rank when None."""
        if axis is None:
            return dist.get_rank()
        return self.device_mesh.get_local_rank(self._axis_index(axis))

    def group(self, axis: str) -> dist.ProcessGroup:
        """The process group of the ranks that share this rank's position on the other axes."""
        return self.device_mesh.get_group(self._axis_index(axis))

    def _axis_index(self, axis: str) -> int:
        try:
            return self.axis_names.index(axis)
        except ValueError:
            raise ValueError(f"mesh has no axis {axis!r}; its axes are {self.axis_names}") from None

    def __repr__(self) -> str:
        axes = ", ".join(f"{k}={v}" for k, v in self.shape.items())
        return f"Mesh({axes}, rank={self.rank()}, device={self.device}, backend={self.backend})"

    # ------------------------------------------------------------ collectives

    @contextlib.contextmanager
    def _guard(self, collective: str, axis: str | None) -> Iterator[None]:
        """Re-raise a backend failure as a CollectiveError naming what failed and where."""
        try:
            yield
        except RuntimeError as e:  # DistBackendError, gloo's "Connection closed", timeouts
            where = "the world" if axis is None else f"mesh axis '{axis}'"
            position = "" if axis is None else f", {axis} rank {self.rank(axis)} of {self.size(axis)}"
            raise CollectiveError(
                f"{collective} over {where} failed on rank {self.rank()}{position} "
                f"(backend {self.backend}, timeout {self.timeout_s:g} s); a peer rank probably "
                f"died or stalled, see the other ranks' logs. Cause: {e}"
            ) from e

    @staticmethod
    def _fresh(x: torch.Tensor, fp32: bool) -> torch.Tensor:
        """A contiguous copy of `x` to reduce into (fp32 for low-precision input if asked)."""
        dtype = torch.float32 if fp32 and x.dtype in _LOW_PRECISION else x.dtype
        return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format).copy_(x)

    def psum(self, x: torch.Tensor, axis: str, *, fp32: bool = False) -> torch.Tensor:
        """Sum of `x` over the ranks of `axis`, as a new tensor of x's dtype.

        With `fp32=True`, bf16/fp16 input is summed in fp32 and rounded once at the end.
        """
        out = self._fresh(x.detach(), fp32)
        with self._guard("psum", axis):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group(axis))
        return out.to(x.dtype)

    def pmean(self, x: torch.Tensor, axis: str, *, fp32: bool = False) -> torch.Tensor:
        """Mean of floating-point `x` over the ranks of `axis` (a sum, then one division)."""
        if not x.is_floating_point():
            raise TypeError(f"pmean over '{axis}': expected a floating-point tensor, got {x.dtype}")
        out = self._fresh(x.detach(), fp32)
        with self._guard("pmean", axis):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group(axis))
        return out.div_(self.size(axis)).to(x.dtype)

    def all_gather(self, x: torch.Tensor, axis: str, dim: int = 0) -> torch.Tensor:
        """Every rank's `x` concatenated along tensor dim `dim`, in axis-rank order.

        A 0-d `x` gathers to a vector of length axis size.
        """
        n = self.size(axis)
        x = x.reshape(1) if x.dim() == 0 else x
        moved = x.detach().movedim(dim, 0).contiguous()  # the backend gathers along dim 0
        out = moved.new_empty((n * moved.shape[0], *moved.shape[1:]))
        with self._guard("all_gather", axis):
            _all_gather(out, moved, group=self.group(axis))
        return out.movedim(0, dim)

    def psum_scatter(
        self, x: torch.Tensor, axis: str, *, fp32: bool = False, impl: str | None = None
    ) -> torch.Tensor:
        """Sum `x` over `axis` and return this rank's block of dim 0 (length N / axis size).

        Rank i of the axis gets rows [i * N/n, (i+1) * N/n). N must divide by the axis size
        n; `pad_to_multiple(x, n)` makes it so. `impl` overrides the mesh's reduce_scatter
        choice for this call ("native" or "allreduce"); both give identical sums.
        """
        n = self.size(axis)
        if x.dim() == 0 or x.shape[0] % n:
            raise ValueError(
                f"psum_scatter over '{axis}': dim 0 of shape {tuple(x.shape)} must divide by "
                f"the axis size {n}; pad it with pad_to_multiple(x, {n})"
            )
        impl = self.reduce_scatter if impl is None else impl
        if impl not in REDUCE_SCATTER_IMPLS:
            raise ValueError(f"psum_scatter impl={impl!r}: expected one of {REDUCE_SCATTER_IMPLS}")
        inp = self._fresh(x.detach(), fp32)
        if impl != "allreduce":
            try:
                return self._reduce_scatter_native(inp, axis).to(x.dtype)
            except _Unsupported:
                if impl == "native":
                    raise CollectiveError(f"backend {self.backend} has no reduce-scatter") from None
                self.reduce_scatter = "allreduce"  # decided once; every rank decides the same
        return self._reduce_scatter_fallback(inp, axis).to(x.dtype)

    def _reduce_scatter_native(self, inp: torch.Tensor, axis: str) -> torch.Tensor:
        out = inp.new_empty((inp.shape[0] // self.size(axis), *inp.shape[1:]))
        try:
            with self._guard("psum_scatter", axis):
                _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, group=self.group(axis))
        except CollectiveError as e:
            if _is_unsupported(e.__cause__):
                raise _Unsupported() from e.__cause__
            raise
        return out

    def _reduce_scatter_fallback(self, inp: torch.Tensor, axis: str) -> torch.Tensor:
        """All-reduce, then keep this rank's block: the same sum, n times the traffic."""
        with self._guard("psum_scatter", axis):
            dist.all_reduce(inp, op=dist.ReduceOp.SUM, group=self.group(axis))
        block = inp.shape[0] // self.size(axis)
        return inp.narrow(0, self.rank(axis) * block, block).clone()

    def broadcast(self, x: torch.Tensor, axis: str, src: int = 0) -> torch.Tensor:
        """The `x` of axis index `src`, on every rank of the axis (a new tensor)."""
        n = self.size(axis)
        if not 0 <= src < n:
            raise ValueError(f"broadcast over '{axis}': src={src}, expected 0 <= src < {n}")
        out = self._fresh(x.detach(), fp32=False)
        group = self.group(axis)
        with self._guard("broadcast", axis):
            dist.broadcast(out, src=dist.get_global_rank(group, src), group=group)
        return out

    def barrier(self, axis: str | None = None) -> None:
        """Wait until every rank on `axis` (the whole world when None) gets here."""
        token = torch.zeros(1, device=self.device)
        group = None if axis is None else self.group(axis)
        with self._guard("barrier", axis):
            dist.all_reduce(token, group=group)  # an all-reduce honours the timeout everywhere

    # -------------------------------------------------------------- lifetime

    def destroy(self) -> None:
        """Tear down the process group if this mesh created it (idempotent)."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()


class _Unsupported(Exception):
    """The backend does not implement a collective (raised before any data moves)."""


def _is_unsupported(error: BaseException | None) -> bool:
    text = str(error).lower()
    return isinstance(error, NotImplementedError) or any(
        phrase in text for phrase in ("does not support", "not supported", "unsupported")
    )
