"""`train(exp) -> summary`: one training run, top to bottom, composed from the fnllama modules.

    from fnllama.experiment import ExperimentConfig
    from fnllama.run import train
    summary = train(exp)       # {"first_loss", "last_loss", "min_loss", "throughput", ...}

Sections, in order (each a short helper below `train`):
    mesh              Mesh.create({"dp": N}); the batch shape is checked against the real dp
    data              the packed loader over the Megatron dataset(s), this rank's share
    model+optimizer   AdamW over a Megatron schedule; replicated or ZeRO-1/2/3 update rule
    state             fresh from the seed, --init-from-hf weights, or a restored checkpoint
    step              make_train_step with grad accumulation = global / (micro x dp)
    checkpoint        fnllama.checkpoint.Checkpointer (every --save-interval, and at the end)
    loop              step, record the loader position in the state, log, save
    summary           the seed's throughput table; config.json + metrics.jsonl in output_dir
Only rank 0 prints and writes metrics; every rank writes its checkpoint part.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import optree
import torch

from fnllama import model, optim
from fnllama import random as fr
from fnllama.config import ModelConfig, num_params
from fnllama.errors import CheckpointError, ConfigError, DataError
from fnllama.experiment import ExperimentConfig, check_batch, save_json
from fnllama.train import TrainState, init_state, make_train_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")


def train(exp: ExperimentConfig, *, stream=None) -> dict[str, Any]:
    """Train `exp` to `exp.train.train_iters` steps; return the summary (on every rank)."""
    t0 = time.perf_counter()
    tc = exp.train
    # ------------------------------------------------------------------ mesh
    mesh = _make_mesh(exp)
    say = _printer(mesh, stream)
    dp, dp_rank = mesh.size("dp"), mesh.rank("dp")
    check_batch(tc, dp)
    accum = exp.grad_accum_steps(dp)
    say(f"== mesh: {mesh!r}; global batch {exp.grad_accum_steps(dp) * tc.micro_batch_size * dp} = "
        f"micro-batch {tc.micro_batch_size} x grad-accum {accum} x dp {dp}")
    try:
        # -------------------------------------------------------------- data
        loader = build_loader(exp, dp_rank=dp_rank, dp=dp)
        say(f"== data: {' '.join(exp.data.data_path)} (split {exp.data.split}), seq {tc.seq_length}")
        # -------------------------------------------------------------- model + optimizer
        cfg, hf_params = _model_config(exp)
        schedule, adamw = build_optimizer(exp)
        rule = build_update_rule(adamw, exp, mesh)
        say(f"== model: {num_params(cfg):,} parameters ({tc.precision}, recompute {tc.recompute}); "
            f"AdamW lr {exp.optim.lr:g} {exp.optim.lr_decay_style}; ZeRO stage {exp.parallel.zero_stage}")
        # -------------------------------------------------------------- checkpoint
        ckpt = _open_checkpointer(exp, mesh)
        # -------------------------------------------------------------- state
        state, how = _initial_state(exp, cfg, rule, lambda: build_update_rule(adamw, exp, mesh), loader,
                                    ckpt, hf_params, mesh)
        del hf_params
        zero3 = exp.parallel.zero_stage == 3      # params sharded too; the loss gathers each layer
        if zero3:
            state = rule.shard_train_state(state)
        start = int(state.step)
        say(f"== state: {how}; step {start} of {tc.train_iters}")
        # -------------------------------------------------------------- step
        step = make_train_step(cfg, rule, mesh=mesh, compute_dtype=DTYPES[tc.precision],
                               grad_accum_steps=accum, recompute=tc.recompute,
                               clip_grad=exp.optim.clip_grad or None, schedule=schedule,
                               compile=tc.compile, skip_nan=tc.skip_nan,
                               **({"loss_fn": rule.loss_fn} if zero3 else {}))
        # -------------------------------------------------------------- loop
        logger = _metrics_logger(exp, cfg, mesh, start, stream) if mesh.rank() == 0 else None
        shards = checkpoint_shards(state, rule) if ckpt is not None else None
        losses = _loop(exp, step, state, loader, accum, ckpt, logger, mesh, start, shards)
        # -------------------------------------------------------------- summary
        if ckpt is not None:
            ckpt.close()
        throughput = logger.summary() if logger is not None else None
        if logger is not None:
            logger.close()
        summary = _summary(exp, losses, throughput, start, time.perf_counter() - t0)
        say(f"== done: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} "
            f"(min {summary['min_loss']:.4f}) in {summary['wall_s']:.1f} s; metrics in {tc.output_dir}")
        return summary
    finally:
        mesh.destroy()


# ---------------------------------------------------------------------- sections

def _make_mesh(exp: ExperimentConfig):
    from fnllama.mesh import Mesh

    mesh = Mesh.create(timeout_s=exp.parallel.timeout_s)
    if exp.parallel.dp is not None and mesh.size("dp") != exp.parallel.dp:
        world = mesh.size("dp")
        mesh.destroy()
        raise ConfigError(f"--dp {exp.parallel.dp} but the launcher started {world} processes")
    return mesh


def _printer(mesh, stream):
    out = sys.stdout if stream is None else stream
    if mesh.rank() != 0:
        return lambda line: None
    return lambda line: print(line, file=out, flush=True)


def build_loader(exp: ExperimentConfig, *, dp_rank: int, dp: int):
    """This rank's loader over the train split; `next(loader)` is one micro-batch dict."""
    from fnllama.data import gpt_dataset
    from fnllama.data.loader import Loader

    if not exp.data.data_path:
        raise DataError("--data-path is required: the prefix of a dataset made by `fnllama preprocess` "
                        "(e.g. runs/data/alpaca_text_document), or 'W1 PREFIX1 W2 PREFIX2' to blend")
    prefixes, weights = exp.data.blend()
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise DataError(f"--data-path {prefix}: {prefix + ext} not found (run `fnllama preprocess "
                                f"--output-prefix ...` first; the prefix ends in _text_document)")
    _check_vocab(exp)
    dataset = gpt_dataset.build_split(list(zip(weights, prefixes)), seq_length=exp.train.seq_length,
                                      split=exp.data.split, which="train", seed=exp.train.seed)
    return Loader(dataset, micro_batch_size=exp.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp,
                  eod_mask_loss=exp.data.eod_mask_loss)


def _check_vocab(exp: ExperimentConfig) -> None:
    d = exp.data
    if not (d.tokenizer_type and d.tokenizer_model):
        return
    from fnllama.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(d.tokenizer_type, d.tokenizer_model).vocab_size
    if vocab > exp.model.vocab_size:
        raise ConfigError(f"--vocab-size {exp.model.vocab_size} is smaller than the tokenizer's "
                          f"{vocab} ({d.tokenizer_model}); pass --vocab-size {vocab} or more")


def _model_config(exp: ExperimentConfig) -> tuple[ModelConfig, Any]:
    """The model config, and the HF weights when --init-from-hf (their shapes must match)."""
    if not exp.train.init_from_hf:
        return exp.model, None
    from fnllama.hf import load_hf

    hf_cfg, params = load_hf(exp.train.init_from_hf)
    for name in _SHAPE_FIELDS:
        if getattr(hf_cfg, name) != getattr(exp.model, name):
            raise ConfigError(f"--init-from-hf {exp.train.init_from_hf}: its config.json has {name}="
                              f"{getattr(hf_cfg, name)} but the run's model has {getattr(exp.model, name)}; "
                              f"drop --model/overrides to take the shape from the HF directory")
    return exp.model, params


def build_optimizer(exp: ExperimentConfig):
    """(schedule, AdamW factory `mask -> GradientTransformation`); decay iters default to train iters.

    A factory, because ZeRO hands the optimizer its weight-decay mask in the flat layout.
    """
    o = exp.optim
    decay_iters = o.lr_decay_iters or exp.train.train_iters
    schedule = optim.make_schedule(o.lr_decay_style, lr=o.lr, min_lr=o.min_lr, warmup_iters=o.lr_warmup_iters,
                                   warmup_fraction=o.lr_warmup_fraction, decay_iters=decay_iters)

    def adamw(mask):
        return optim.adamw(schedule, b1=o.adam_beta1, b2=o.adam_beta2, eps=o.adam_eps,
                           weight_decay=o.weight_decay, mask=mask)
    return schedule, adamw


def build_update_rule(adamw, exp: ExperimentConfig, mesh):
    """Replicated optimizer state (stage 0) or ZeRO's sharded rules (stages 1, 2; 3 shards the
    params too); norms and other 1-D leaves are exempt from weight decay (`optim.default_decay_mask`)."""
    from fnllama import zero

    return zero.make_rule(adamw, mesh, stage=exp.parallel.zero_stage, decay_mask=optim.default_decay_mask)


def _open_checkpointer(exp: ExperimentConfig, mesh, directory: str | None = None):
    """The run's Checkpointer on --save (or on `directory`, to read --load); None without."""
    tc = exp.train
    directory = directory or tc.save
    if directory is None:
        return None
    from fnllama.checkpoint import Checkpointer

    if directory != tc.save:  # only read (--load): no cleanup, no barrier, nothing created
        return Checkpointer(directory, rank=mesh.rank(), world_size=mesh.world_size, read_only=True)
    return Checkpointer(directory, save_interval=tc.save_interval or tc.train_iters,
                        rank=mesh.rank(), world_size=mesh.world_size)


def _initial_state(exp, cfg, rule, fresh_rule, loader, ckpt, hf_params, mesh) -> tuple[TrainState, str]:
    """The starting state: restored (--load/--resume), from HF weights or a params-only
    checkpoint (`fnllama convert-hf`), or fresh from the seed.

    `fresh_rule()` makes an unbound update rule for the restore template (a ZeRO rule binds its
    layout to the first tree it sees, and the template lives on the meta device).
    """
    tc = exp.train
    params, how = hf_params, (f"initialised from HF weights in {tc.init_from_hf}" if hf_params is not None
                              else f"fresh (seed {tc.seed})")
    if tc.load or tc.resume:
        same_dir = ckpt is not None and (not tc.load or os.path.abspath(tc.load) == ckpt.directory)
        reader = ckpt if same_dir else _open_checkpointer(exp, mesh, tc.load)
        try:
            if reader.latest_step() is not None and is_params_only(reader, tc.load_step):
                params, step = _restore_params(exp, cfg, reader, mesh.device)
                how = f"initialised from the params of step {step} in {reader.directory}"
            else:
                state = _restore(exp, cfg, fresh_rule(), loader, reader, mesh.device)
                if state is not None:
                    return state, f"restored step {int(state.step)} from {reader.directory}"
                if tc.load:
                    raise CheckpointError(f"--load {tc.load}: no committed checkpoint there")
        finally:
            if reader is not ckpt:
                reader.close()
    state = init_state(fr.key(tc.seed), cfg, rule, params=params, compute_dtype=DTYPES[tc.precision],
                       device=mesh.device)
    return state._replace(data=loader.state()), how


def checkpoint_shards(state: TrainState, rule) -> dict[str, Any]:
    """{leaf path: checkpoint.Shard} for the optimizer state's moments in the params' flat layout.

    ZeRO (stages 1, 2): each {"flat": [S]} leaf is this rank's slice [r*S, (r+1)*S). Replicated:
    each params-shaped moment leaf sits at that param's offset. The group is the path above
    the params (e.g. "opt_state.0.mu"), so both forms name the same logical buffers and a
    checkpoint restores across dp sizes and ZeRO stages 0/1/2.
    """
    from fnllama import tree, zero
    from fnllama.checkpoint import Shard, leaf_paths

    paths, leaves, _ = leaf_paths(state)
    moments = [(p, l) for p, l in zip(paths, leaves)
               if p.startswith("opt_state.") and isinstance(l, torch.Tensor) and l.ndim > 0]
    if isinstance(rule, zero.ZeroRule):
        plan = zero.make_plan(state.params, dp=rule.dp, rank=rule.dp_rank, bucket_bytes=rule.bucket_bytes)
        layout, (lo, hi) = plan.layout, plan.shard_range     # the rule's plan (it may not be bound yet)
        suffix = "." + zero.FLAT
        return {p: Shard(p[:-len(suffix)], lo, layout.total) for p, l in moments
                if p.endswith(suffix) and tuple(l.shape) == (hi - lo,)}
    layout = tree.make_layout(state.params)
    where = {p: (o, shape) for p, o, shape in zip(layout.paths, layout.offsets, layout.shapes)}
    out = {}
    for p, l in moments:
        for i in (i for i, c in enumerate(p) if c == "."):
            offset, shape = where.get(p[i + 1:], (None, None))
            if offset is not None and shape == tuple(l.shape):
                out[p] = Shard(p[:i], offset, layout.total)
                break
    return out


def is_params_only(reader, step: int | None) -> bool:
    """True for a checkpoint that holds only `params.*` leaves (as `fnllama convert-hf` writes)."""
    flat_meta = reader.leaf_metadata(step)
    return all(p.startswith("params.") for p in flat_meta)


def _restore_params(exp, cfg, reader, device) -> tuple[Any, int]:
    """(params, step) of a params-only checkpoint, checked against the run's model shape."""
    template = {"params": model.init(fr.key(exp.train.seed), cfg, device="meta")}
    step = reader.latest_step() if exp.train.load_step is None else exp.train.load_step
    saved, _ = reader.restore(template, step, device=device)
    return saved["params"], step


def _restore(exp, cfg, template_rule, loader, reader, device) -> TrainState | None:
    """The latest (or --ckpt-step) committed state of `reader`, or None when it has none.

    The optimizer state is restored through its logical layout (`checkpoint_shards`), so a
    checkpoint of another dp size or ZeRO stage fits.
    """
    tc = exp.train
    if reader.latest_step() is None:
        return None
    template = init_state(fr.key(tc.seed), cfg, template_rule, compute_dtype=DTYPES[tc.precision], device="meta")
    template = template._replace(data=loader.state())
    state, _ = reader.restore(template, tc.load_step, device=device,
                              shards=checkpoint_shards(template, template_rule))
    loader.restore(state.data)
    host = lambda t: t.cpu()  # noqa: E731 - counters and keys live on the host, as init_state makes them
    return state._replace(step=host(state.step), key=host(state.key), skipped=host(state.skipped),
                          loss_scale=optree.tree_map(host, state.loss_scale))


def _metrics_logger(exp: ExperimentConfig, cfg: ModelConfig, mesh, start: int, stream):
    from fnllama.metrics import MetricsLogger, flops_per_token

    tc = exp.train
    os.makedirs(tc.output_dir, exist_ok=True)
    save_json(exp, os.path.join(tc.output_dir, "config.json"))
    path = os.path.join(tc.output_dir, "metrics.jsonl")
    _truncate_metrics(path, start)
    return MetricsLogger(path, flops_per_token=flops_per_token(cfg, tc.seq_length, recompute=tc.recompute),
                         global_batch=exp.grad_accum_steps(mesh.size("dp")) * tc.micro_batch_size * mesh.size("dp"),
                         seq_len=tc.seq_length, n_devices=mesh.world_size, device=mesh.device,
                         dtype=DTYPES[tc.precision], peak_tflops=tc.peak_tflops,
                         log_interval=tc.log_interval, total_steps=tc.train_iters, stream=stream)


def _truncate_metrics(path: str, start: int) -> None:
    """Keep only records of steps <= `start` (a fresh run starts an empty file)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("iteration", 0) <= start]
    with open(path, "w") as f:
        f.writelines(kept)


def _loop(exp, step, state, loader, accum, ckpt, logger, mesh, start, shards) -> list[float]:
    from fnllama.metrics import StepTimer
    from fnllama import device as devices

    tc = exp.train
    config = exp.to_dict()
    timer = StepTimer(sync=lambda: devices.synchronize(mesh.device))
    losses: list[float] = []
    for it in range(start + 1, tc.train_iters + 1):
        micro = [_to_device(next(loader), mesh.device) for _ in range(accum)]
        state, m = step(state, micro)
        state = state._replace(data=loader.state())
        losses.append(m["loss"])
        if logger is not None:
            logger.log(it, step_time_s=timer.lap(), loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"],
                       loss_scale=m["loss_scale"], skipped=m["skipped"])
        if ckpt is not None and tc.save and (it % ckpt.save_interval == 0 or it == tc.train_iters):
            ckpt.save(it, state, config, force=True, shards=shards)
            timer.reset()                   # the save's host copy is not the next step's time
        del micro
    return losses


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _summary(exp, losses: list[float], throughput, start: int, wall_s: float) -> dict[str, Any]:
    finite = [l for l in losses if math.isfinite(l)]
    return {
        "name": exp.name, "start_step": start, "end_step": start + len(losses),
        "first_loss": losses[0] if losses else math.nan, "last_loss": losses[-1] if losses else math.nan,
        "min_loss": min(finite) if finite else math.nan, "losses": losses,
        "throughput": None if throughput is None else dataclasses.asdict(throughput), "wall_s": wall_s, "output_dir": exp.train.output_dir,
        "metrics": os.path.join(exp.train.output_dir, "metrics.jsonl"),
    }


# ---------------------------------------------------------------------- dry run

def dry_run(exp: ExperimentConfig, *, tflops: float | None = None, stream=None) -> dict[str, Any]:
    """Size the run without allocating it: meta-device params, then the fnllama.plan table."""
    from fnllama.plan import format_plan, plan
    from fnllama.tree import num_elements

    out = sys.stdout if stream is None else stream
    tc, dp = exp.train, exp.parallel.dp_size
    n = num_elements(model.init(fr.key(tc.seed), exp.model, device="meta"))
    p = plan(exp.model, n_devices=dp, zero_stage=exp.parallel.zero_stage, seq_len=tc.seq_length,
             micro_batch=tc.micro_batch_size, dtype=tc.precision, recompute=tc.recompute,
             grad_accum=exp.grad_accum_steps(dp))
    print(f"{exp.name}: {n:,} parameters (meta device, nothing allocated)", file=out)
    print(format_plan(p, name=exp.name, tflops=tflops), file=out)
    tokens = p.global_batch * tc.seq_length * tc.train_iters
    line = f"{tc.train_iters} iterations x {p.global_batch * tc.seq_length:,} tokens = {tokens:,} tokens"
    if tflops:
        hours = p.seconds_per_step(tflops) * tc.train_iters / 3600
        line += f"; expected {hours:.2f} h at {tflops:g} TFLOP/s per device"
    print(line, file=out, flush=True)
    return {"n_params": n, "plan": p}
