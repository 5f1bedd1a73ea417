"""`fnllama train`: Megatron-style flags -> an `ExperimentConfig` -> `fnllama.run.train`.

    fnllama train --model small --data-path runs/data/alpaca_text_document \\
        --seq-length 256 --micro-batch-size 8 --global-batch-size 16 --train-iters 300 \\
        --lr 1e-3 --lr-warmup-iters 20 --bf16 --save runs/small/ckpt --save-interval 100

    fnllama train --config experiments/quickstart.py --bf16       # a config file, then overrides
    fnllama train --nproc-per-node 8 --zero-stage 1 ...           # re-launches under torchrun
    torchrun --nproc-per-node 8 -m fnllama.cli train ...          # the same, launched by hand

Flags keep Megatron's names. Every flag defaults to "not given": the base config is the
`--config` file's `get_config()` (or `ExperimentConfig()` defaults), and only the flags on the
command line replace its fields, so a config file holds the run and the command line the
deltas. `--init-from-hf DIR` without `--model` takes the model shape from DIR's config.json,
and `--load CKPT` without `--model`/`--config` from the config saved in the checkpoint.
`--dry-run` prints the resolved config and the memory/FLOPs plan without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from typing import Any

from fnllama.cli import VerbParser
from fnllama.config import PRESETS, from_hf, get_preset
from fnllama.experiment import ExperimentConfig, load_experiment_file

# flag dest -> (section, field). Every other dest is handled by name below.
_FIELDS: dict[str, tuple[str, str]] = {
    # model overrides (Megatron name -> ModelConfig field)
    "num_layers": ("model", "n_layers"), "hidden_size": ("model", "dim"),
    "ffn_hidden_size": ("model", "ffn_dim"), "num_attention_heads": ("model", "n_heads"),
    "num_query_groups": ("model", "n_kv_heads"), "vocab_size": ("model", "vocab_size"),
    "max_position_embeddings": ("model", "max_seq_len"), "norm_epsilon": ("model", "norm_eps"),
    "rotary_base": ("model", "rope_theta"), "init_method_std": ("model", "init_std"),
    # data
    "data_path": ("data", "data_path"), "split": ("data", "split"),
    "tokenizer_type": ("data", "tokenizer_type"), "tokenizer_model": ("data", "tokenizer_model"),
    "tokenizer_name_or_path": ("data", "tokenizer_model"), "eod_mask_loss": ("data", "eod_mask_loss"),
    # parallel
    "dp": ("parallel", "dp"), "zero_stage": ("parallel", "zero_stage"),
    "nproc_per_node": ("parallel", "nproc_per_node"), "nnodes": ("parallel", "nnodes"),
    "node_rank": ("parallel", "node_rank"), "master_addr": ("parallel", "master_addr"),
    "master_port": ("parallel", "master_port"),
    # train (the Megatron names that differ from the field names)
    "ckpt_step": ("train", "load_step"),
}
_OPTIM = ("lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_warmup_fraction", "lr_decay_iters",
          "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad")
_TRAIN = ("seq_length", "micro_batch_size", "global_batch_size", "train_iters", "precision", "recompute",
          "seed", "log_interval", "output_dir", "save", "save_interval", "load", "resume", "init_from_hf",
          "skip_nan", "compile", "peak_tflops")
_FIELDS.update({name: ("optim", name) for name in _OPTIM})
_FIELDS.update({name: ("train", name) for name in _TRAIN})


def _parser() -> argparse.ArgumentParser:
    p = VerbParser(prog="fnllama train", description=__doc__.split("\n")[0],
                   argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("experiment")
    g.add_argument("--config", help="experiments/NAME.py with get_config() (or a saved config.json)")
    g.add_argument("--dry-run", action="store_true", help="print the config and plan, do not train")
    g.add_argument("--name", help="run name (logged)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"preset: {', '.join(PRESETS)}")
    for flag, kind in (("--num-layers", int), ("--hidden-size", int), ("--ffn-hidden-size", int),
                       ("--num-attention-heads", int), ("--num-query-groups", int), ("--vocab-size", int),
                       ("--max-position-embeddings", int), ("--norm-epsilon", float),
                       ("--rotary-base", float), ("--init-method-std", float)):
        g.add_argument(flag, type=kind)
    g.add_argument("--init-from-hf", metavar="DIR", help="start from an HF LLaMA directory's weights")
    g = p.add_argument_group("optimizer")
    for flag in ("--lr", "--min-lr", "--lr-warmup-fraction", "--weight-decay", "--adam-beta1",
                 "--adam-beta2", "--adam-eps", "--clip-grad"):
        g.add_argument(flag, type=float)
    g.add_argument("--lr-warmup-iters", type=int)
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"])
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="PREFIX, or blend 'W1 PREFIX1 W2 PREFIX2 ...'")
    g.add_argument("--split", help="train,valid,test weights, e.g. 969,30,1")
    g.add_argument("--tokenizer-type", help="checks the model's vocabulary covers the tokenizer's")
    g.add_argument("--tokenizer-model", help="sentencepiece .model file")
    g.add_argument("--tokenizer-name-or-path", help="HF tokenizer directory")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on labels that start a document")
    g = p.add_argument_group("training")
    for flag in ("--seq-length", "--micro-batch-size", "--global-batch-size", "--train-iters", "--seed",
                 "--log-interval"):
        g.add_argument(flag, type=int)
    precision = g.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32")
    g.add_argument("--recompute", choices=["none", "selective", "full"], help="activation recompute")
    g.add_argument("--skip-nan", action="store_true", help="skip non-finite steps instead of stopping")
    g.add_argument("--compile", action="store_true", help="torch.compile the loss (eager fallback)")
    g.add_argument("--output-dir", help="config.json and metrics.jsonl go here (default runs/train)")
    g.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", metavar="DIR")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--load", metavar="DIR", help="restore the latest committed step of DIR")
    g.add_argument("--ckpt-step", type=int, help="with --load/--resume: restore this step")
    g.add_argument("--resume", action="store_true", help="restore from --save when it holds a checkpoint")
    g = p.add_argument_group("distributed")
    g.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    for flag in ("--nproc-per-node", "--nnodes", "--node-rank", "--master-port", "--dp"):
        g.add_argument(flag, type=int)
    g.add_argument("--master-addr")
    g.add_argument("--distributed-timeout-minutes", type=float)
    return p


# ---------------------------------------------------------------- flags -> config

def _base(args: dict[str, Any]) -> ExperimentConfig:
    if "config" in args:
        return load_experiment_file(args["config"])
    return ExperimentConfig()


def _model(base: ExperimentConfig, args: dict[str, Any]):
    if "model" in args:
        return get_preset(args["model"])                     # lists known presets when unknown
    if "load" in args and "config" not in args:      # the shape the checkpoint was saved with
        from fnllama.checkpoint import Checkpointer
        from fnllama.convert import model_config_of

        reader = Checkpointer(args["load"], read_only=True)
        step = args.get("ckpt_step")
        return model_config_of(reader.saved_config(step), f"--load {args['load']}")
    if "init_from_hf" in args and "config" not in args:
        return from_hf(args["init_from_hf"])
    return base.model


def build_config(argv: list[str]) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Parse `argv` and resolve it against the `--config` file (or defaults)."""
    args = vars(_parser().parse_args(argv))
    base = _base(args)
    sections = {"model": {}, "optim": {}, "data": {}, "parallel": {}, "train": {}}
    for dest, value in args.items():
        if dest in _FIELDS:
            section, name = _FIELDS[dest]
            sections[section][name] = tuple(value) if name == "data_path" else value
    if "distributed_timeout_minutes" in args:
        sections["parallel"]["timeout_s"] = 60.0 * args["distributed_timeout_minutes"]
    if "WORLD_SIZE" in os.environ and "dp" not in sections["parallel"]:
        sections["parallel"]["dp"] = int(os.environ["WORLD_SIZE"])   # launched by (our or a user's) torchrun
    model = _model(base, args)
    resolved = {"model": model.replace(**sections["model"])}
    for name in ("optim", "data", "parallel", "train"):
        resolved[name] = dataclasses.replace(getattr(base, name), **sections[name])
    return base.replace(name=args.get("name", base.name), **resolved), args


# ---------------------------------------------------------------- launch

def _under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(exp: ExperimentConfig, argv: list[str]) -> list[str]:
    """The `python -m torch.distributed.run ... -m fnllama.cli train ARGV` line for this run."""
    p = exp.parallel
    debug = ["--debug"] if "--debug" in sys.argv else []
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={p.nproc_per_node}",
            f"--nnodes={p.nnodes}", f"--node-rank={p.node_rank}", f"--master-addr={p.master_addr}",
            f"--master-port={p.master_port}", "-m", "fnllama.cli", *debug, "train", *argv]


def cli_main(argv: list[str]) -> int:
    exp, args = build_config(argv)
    if args.get("dry_run"):
        from fnllama.run import dry_run
        dry_run(exp)
        return 0
    if exp.parallel.launched > 1 and not _under_torchrun():
        cmd = torchrun_command(exp, argv)
        print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
        return subprocess.call(cmd)
    from fnllama.run import train
    train(exp)
    return 0
