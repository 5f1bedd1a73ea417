"""The seed's recipe: LLaMA2-7B from HF weights on the Alpaca parquet, 8 devices, ZeRO-1, bf16.

Shape (the seed's figures imply it: 2459.6 tokens/s/p / 4.804 samples/s/p = 512 tokens per
sample, and 4.804 samples/s/p x 8 devices x 6.66 s/step = 256 samples per step):
seq 512, micro-batch 1, global batch 256 = 1 x 32 accumulation steps x 8 devices, 1024
iterations (134M tokens), full activation recompute, AdamW at a fine-tuning lr (1.25e-6).

    # 1. preprocess the Alpaca parquet with the model's own tokenizer
    fnllama preprocess --input $DATA_DIR/train-00000-of-00001-a09b74b3ef9c3b56.parquet \\
        --tokenizer-type PretrainedFromHF --tokenizer-name-or-path $HF_DIR \\
        --output-prefix $DATA_DIR/alpaca --workers 4 --append-eod
    # 2. train on 8 devices (this file re-launches itself under torchrun)
    HF_DIR=... DATA_PATH=$DATA_DIR/alpaca_text_document python experiments/llama2_7b_zero_8p.py
    # or: fnllama train --config experiments/llama2_7b_zero_8p.py [--fp16] [--save DIR ...]

On a machine without accelerators:

    python experiments/llama2_7b_zero_8p.py --dry-run [--tflops 147.4]
        6,738,415,616 parameters (meta device) and the per-device memory / FLOPs plan
    python experiments/llama2_7b_zero_8p.py --shrink
        the same recipe shrunk (2 layers, dim 64, demo data, 2 gloo processes, 8 steps)

Expected on 8 x Ascend 910B: about 6.7 s/step, 4.8 samples/s/p, 147 TFLOP/s per device (the
seed's figures); at 147.4 TFLOP/s the plan predicts ~6 s/step (Megatron FLOP count).
Environment: HF_DIR (default ./llama-2-7b-hf), DATA_PATH (default
./dataset/alpaca_text_document), SAVE_DIR (default ./ckpt/llama2_7b_zero_8p), OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import os
import sys

from fnllama.config import ModelConfig, get_preset
from fnllama.experiment import DataConfig, ExperimentConfig, OptimConfig, ParallelConfig, TrainConfig

SEED_TFLOPS = 147.4     # the seed's measured TFLOP/s per device


def get_config(*, fp16: bool = False) -> ExperimentConfig:
    hf_dir = os.environ.get("HF_DIR", "./llama-2-7b-hf")
    save = os.environ.get("SAVE_DIR", "./ckpt/llama2_7b_zero_8p")
    return ExperimentConfig(
        name="llama2_7b_zero_8p",
        model=get_preset("llama2-7b"),
        optim=OptimConfig(lr=1.25e-6, min_lr=1.25e-7, lr_decay_style="cosine", lr_warmup_fraction=0.01,
                          weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0),
        data=DataConfig(data_path=(os.environ.get("DATA_PATH", "./dataset/alpaca_text_document"),),
                        split="100,0,0", tokenizer_type="PretrainedFromHF", tokenizer_model=hf_dir),
        parallel=ParallelConfig(nproc_per_node=8, zero_stage=1),
        train=TrainConfig(seq_length=512, micro_batch_size=1, global_batch_size=256, train_iters=1024,
                          precision="fp16" if fp16 else "bf16", recompute="full", seed=1234,
                          log_interval=1, output_dir=os.environ.get("OUTPUT_DIR", "runs/llama2_7b_zero_8p"),
                          save=save, save_interval=256, init_from_hf=hf_dir),
    )


def shrink(exp: ExperimentConfig, data_dir: str, output_dir: str) -> ExperimentConfig:
    """The recipe at toy size for CPU: 2 gloo processes, ZeRO-1, recompute, on the demo data."""
    from fnllama.data import demo

    prefix = demo.build_demo_dataset(data_dir, seed=0, workers=2)
    model = ModelConfig(vocab_size=2048, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=172,
                        max_seq_len=64)
    return exp.replace(
        name=exp.name + "_shrunk", model=model,
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, lr_warmup_iters=1, lr_decay_style="cosine"),
        data=DataConfig(data_path=(prefix,), split="98,2,0"),
        parallel=ParallelConfig(nproc_per_node=2, zero_stage=exp.parallel.zero_stage, master_port=29517),
        train=TrainConfig(seq_length=64, micro_batch_size=1, global_batch_size=8, train_iters=8,
                          precision="fp32", recompute=exp.train.recompute, log_interval=1,
                          output_dir=output_dir, save=os.path.join(output_dir, "ckpt"), save_interval=4),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="parameter count and plan, no training")
    p.add_argument("--shrink", action="store_true", help="toy-size run on 2 gloo processes")
    p.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling instead of bf16")
    p.add_argument("--tflops", type=float, default=SEED_TFLOPS, help="TFLOP/s per device for --dry-run")
    p.add_argument("--data-dir", default=os.path.join("runs", "demo-data"), help="--shrink: demo data")
    p.add_argument("--output-dir", default=os.path.join("runs", "llama2_7b_zero_8p_shrunk"))
    args, rest = p.parse_known_args(argv)
    exp = get_config(fp16=args.fp16)
    if args.dry_run:
        from fnllama.run import dry_run
        dry_run(exp, tflops=args.tflops)
        return 0
    from fnllama.experiment import save_json
    from fnllama.train_cli import cli_main

    if args.shrink:
        exp = shrink(exp, args.data_dir, args.output_dir)
    # Through the CLI, so the run (re-)launches itself under torchrun and flags in `rest` apply.
    config_path = save_json(exp, os.path.join(exp.train.output_dir, "launch_config.json"))
    return cli_main(["--config", config_path, *rest])


if __name__ == "__main__":
    sys.exit(main())
