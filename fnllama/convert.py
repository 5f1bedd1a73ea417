"""HF weights into and out of fnllama checkpoints: `fnllama convert-hf` and `fnllama export-hf`.

    fnllama convert-hf --input-model-dir hf/Llama-2-7b-hf --output-dir runs/7b/init
    fnllama train --load runs/7b/init ...                  # starts at step 0 from those weights
    fnllama export-hf --checkpoint runs/7b/ckpt [--step 1000] --output-dir runs/7b/hf

convert-hf writes a *params-only* checkpoint: one committed step 0 holding just the fp32
`params.*` leaves, and the config {"model": ModelConfig fields, "source": DIR}. No optimizer
state, step counter or data position: those belong to a run (its optimizer, ZeRO stage and dp
size), so `fnllama train --load` recognises a params-only checkpoint and builds a fresh state
(step 0, new optimizer) from its weights, exactly like `--init-from-hf DIR` does. The model
shape comes from the checkpoint's config when `--load` is given without `--model`/`--config`.

export-hf reads the model shape from the config saved in the checkpoint (a run saves its whole
resolved config; convert-hf saves the model), so it needs no flags besides the paths. It reads
only the params of rank 0's part (params are replicated; ZeRO shards only optimizer state), so
checkpoints of any dp size or ZeRO stage 0-2 export the same way, and writes the directory with
`fnllama.hf.save_hf` (which `transformers.LlamaForCausalLM.from_pretrained` loads).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from fnllama.cli import VerbParser
from fnllama.config import ModelConfig
from fnllama.errors import CheckpointError, ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- HF -> checkpoint

def convert_hf(input_model_dir: str | os.PathLike, output_dir: str | os.PathLike) -> int:
    """Write the HF directory's weights as a params-only checkpoint (step 0); returns the step."""
    from fnllama.checkpoint import Checkpointer
    from fnllama.hf import load_hf

    output_dir = os.fspath(output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise CheckpointError(f"--output-dir {output_dir}: already exists and is not empty")
    cfg, params = load_hf(input_model_dir)
    config = {"model": dataclasses.asdict(cfg), "source": os.path.abspath(os.fspath(input_model_dir)),
              "kind": "params-only"}
    with Checkpointer(output_dir, async_save=False) as ckpt:
        ckpt.save(0, {"params": params}, config, force=True)
    return 0


# ---------------------------------------------------------------- checkpoint -> HF

def model_config_of(config: dict, where: str) -> ModelConfig:
    """The ModelConfig saved in a checkpoint's config (a run's, or convert-hf's)."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{where}: the saved config has no 'model' section")
    try:
        return ModelConfig(**model)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{where}: the saved model config is not valid: {e}") from e


def load_params(checkpoint: str | os.PathLike, step: int | None = None):
    """(params, ModelConfig, step) from a checkpoint directory, reading only the params."""
    from fnllama import model
    from fnllama import random as fr
    from fnllama.checkpoint import Checkpointer

    reader = Checkpointer(checkpoint, read_only=True)
    steps = reader.all_steps()
    if not steps:
        raise CheckpointError(f"no committed checkpoint in {reader.directory}")
    if step is not None and step not in steps:
        raise CheckpointError(f"step {step} is not a committed checkpoint in {reader.directory} "
                              f"(committed: {steps})")
    step = steps[-1] if step is None else step
    cfg = model_config_of(reader.saved_config(step), f"{reader.directory} step {step}")
    template = {"params": model.init(fr.key(0), cfg, device="meta")}
    state, _ = reader.restore(template, step, partial=True)
    return state["params"], cfg, step


def export_hf(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, *, step: int | None = None,
              dtype: torch.dtype | None = None) -> int:
    """Write the checkpoint's params (step `step`, default the latest) as an HF directory."""
    from fnllama.hf import save_hf

    params, cfg, step = load_params(checkpoint, step)
    save_hf(params, cfg, output_dir, dtype=dtype)
    return step


# ---------------------------------------------------------------- CLI

def cli_main_convert(argv: list[str]) -> int:
    p = VerbParser(prog="fnllama convert-hf", description="HF LLaMA directory -> params-only fnllama checkpoint")
    p.add_argument("--input-model-dir", required=True, help="HF directory (config.json + safetensors/bin)")
    p.add_argument("--output-dir", required=True, help="the checkpoint directory to create")
    args = p.parse_args(argv)
    convert_hf(args.input_model_dir, args.output_dir)
    print(f"wrote {args.output_dir} (params-only, step 0); start a run from it with "
          f"fnllama train --load {args.output_dir} ...", file=sys.stderr)
    return 0


def cli_main_export(argv: list[str]) -> int:
    p = VerbParser(prog="fnllama export-hf", description="fnllama checkpoint -> HF LLaMA directory")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (--save of a run)")
    p.add_argument("--step", type=int, help="the committed step to export (default: the latest)")
    p.add_argument("--output-dir", required=True, help="the HF directory to create")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="stored dtype (default: fp32, as trained)")
    args = p.parse_args(argv)
    step = export_hf(args.checkpoint, args.output_dir, step=args.step,
                     dtype=_DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {args.output_dir} from step {step} of {args.checkpoint}", file=sys.stderr)
    return 0
