"""Quickstart: from nothing to a trained small LLaMA on the CPU, with no network.

    python experiments/quickstart.py                      # fp32, 1-2 min on 2 CPU cores
    python experiments/quickstart.py --bf16 --output-dir runs/quickstart_bf16
    fnllama compare runs/quickstart_bf16 runs/quickstart --output-dir runs/compare

Steps: (1) generate the demo Alpaca-format parquet (templated tasks: arithmetic, sorting,
reversing...) and train its 2048-piece sentencepiece tokenizer, (2) preprocess it into a
Megatron indexed dataset with 2 worker processes, (3) train a 1.3M-parameter LLaMA (4 layers,
dim 128, GQA 4/2 heads) for 300 steps of 16 x 128 tokens, AdamW 3e-3 with cosine decay,
(4) save a checkpoint, print the throughput summary, and write `metrics.jsonl`,
`config.json` and `loss.png` into `runs/quickstart/`.

Expected: the loss starts at ln(2048) = 7.62 and ends near 0.5 (measured: step 1 7.618,
step 300 0.50, best 0.45; 0.15-0.27 s/step on 2 shared cores, so about a minute of training;
cores oversubscribed by other jobs can make it several times slower). The run checks that the
loss fell by more than half of the way from ln(vocab) to the best loss reached, and exits 1 if
not. The same run as a config file:

    fnllama train --config experiments/quickstart.py [--bf16] [--train-iters N] ...

(`get_config()` builds the demo dataset first if it is missing.)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from fnllama.config import ModelConfig
from fnllama.experiment import DataConfig, ExperimentConfig, OptimConfig, ParallelConfig, TrainConfig

DATA_DIR = os.path.join("runs", "demo-data")
OUTPUT_DIR = os.path.join("runs", "quickstart")
TRAIN_ITERS = 300


def prepare_data(data_dir: str = DATA_DIR, *, workers: int = 2, log=print) -> tuple[str, str]:
    """Demo parquet + tokenizer, preprocessed with `workers` processes; (prefix, tokenizer)."""
    from fnllama.data import demo
    from fnllama.data.preprocess import output_prefix_for, preprocess

    paths = demo.prepare_demo(data_dir, seed=0)
    prefix = output_prefix_for(os.path.join(paths.directory, "alpaca"), "text")
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        stats = preprocess(paths.parquet, os.path.join(paths.directory, "alpaca"),
                           tokenizer_type="SentencePieceTokenizer", tokenizer_path=paths.tokenizer_model,
                           append_eod=True, workers=workers, log_interval=0, log=lambda _: None)
        s = stats["text"]
        log(f"preprocessed {paths.parquet}: {s.documents} documents, {s.tokens} tokens -> {s.prefix}")
    return prefix, paths.tokenizer_model


def get_config(data_dir: str = DATA_DIR, output_dir: str = OUTPUT_DIR, *, precision: str = "fp32",
               train_iters: int = TRAIN_ITERS, seed: int = 1234) -> ExperimentConfig:
    prefix, tokenizer = prepare_data(data_dir, log=lambda _: None)
    return ExperimentConfig(
        name="quickstart",
        model=ModelConfig(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=344,
                          max_seq_len=128),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, lr_warmup_iters=min(20, train_iters // 5),
                          lr_decay_style="cosine", weight_decay=0.1, adam_beta2=0.95, clip_grad=1.0),
        data=DataConfig(data_path=(prefix,), split="98,2,0", tokenizer_type="SentencePieceTokenizer",
                        tokenizer_model=tokenizer),
        parallel=ParallelConfig(),
        train=TrainConfig(seq_length=128, micro_batch_size=16, global_batch_size=16, train_iters=train_iters,
                          precision=precision, seed=seed, log_interval=1, output_dir=output_dir,
                          save=os.path.join(output_dir, "ckpt"), save_interval=100),
    )


def plot_loss(metrics_path: str, png_path: str, *, vocab_size: int) -> str:
    """One run's loss curve (every logged record) against ln(vocab) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fnllama.compare import load_losses

    losses = load_losses(metrics_path)
    steps = sorted(losses)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, [losses[s] for s in steps], label="train loss")
    ax.axhline(math.log(vocab_size), color="gray", linestyle=":", label=f"ln({vocab_size}) (uniform)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("fnllama quickstart")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def check_loss_fell(losses: list[float], vocab_size: int) -> tuple[bool, str]:
    """The quickstart's bar: the final loss is below the midpoint between ln(V) and the best."""
    start, best, end = math.log(vocab_size), min(losses), losses[-1]
    bar = best + 0.5 * (start - best)
    ok = end <= bar
    return ok, (f"loss: step 1 {losses[0]:.3f}, last {end:.3f}, best {best:.3f}; ln(V) = {start:.3f}; "
                f"must end <= {bar:.3f} (half-way from ln(V) to the best): {'ok' if ok else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fnllama quickstart: demo data -> preprocess -> train on CPU")
    p.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 master weights)")
    p.add_argument("--train-iters", type=int, default=TRAIN_ITERS)
    p.add_argument("--output-dir", default=OUTPUT_DIR)
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    from fnllama.run import train

    t0 = time.perf_counter()
    print(f"== demo data in {args.data_dir} (generated once, then reused)")
    prepare_data(args.data_dir, workers=2)
    exp = get_config(args.data_dir, args.output_dir, precision="bf16" if args.bf16 else "fp32",
                     train_iters=args.train_iters, seed=args.seed)
    summary = train(exp)
    png = plot_loss(summary["metrics"], os.path.join(args.output_dir, "loss.png"),
                    vocab_size=exp.model.vocab_size)
    ok, line = check_loss_fell(summary["losses"], exp.model.vocab_size)
    print(line)
    print(f"wrote {png}, {summary['metrics']}, {os.path.join(args.output_dir, 'config.json')}; "
          f"checkpoint in {exp.train.save}; total {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
