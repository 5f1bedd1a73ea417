"""A training run as code: frozen config dataclasses nested in one `ExperimentConfig`.

    exp = ExperimentConfig(
        model=get_preset("small"),
        optim=OptimConfig(lr=1e-3, lr_warmup_iters=20),
        data=DataConfig(data_path=("/data/alpaca_text_document",)),
        parallel=ParallelConfig(nproc_per_node=8, zero_stage=1),
        train=TrainConfig(seq_length=512, micro_batch_size=1, global_batch_size=256, train_iters=1024,
                          precision="bf16", recompute="full"),
    )
    fnllama.run.train(exp)

An experiment file (`experiments/*.py`) is a module with `get_config() -> ExperimentConfig`
(big_vision style); `fnllama train --config FILE` loads it and the command-line flags override
its fields. Every dataclass validates itself in `__post_init__`, and the messages name the
command-line flag (the field's spelling in Megatron), the value and the fix, because that is
what a user typed. `to_dict`/`from_dict` round-trip the whole config through JSON; the
resolved config is written as `config.json` next to each run's metrics and checkpoints.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any

from fnllama.config import ModelConfig
from fnllama.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
RECOMPUTE_MODES = ("none", "selective", "full")
DECAY_STYLES = ("constant", "linear", "cosine")


def _flag(name: str) -> str:
    """The command-line spelling of a field: `micro_batch_size` -> `--micro-batch-size`."""
    return "--" + name.replace("_", "-")


def _positive(obj: Any, *names: str, minimum: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ConfigError(f"{_flag(name)} {value!r}: expected an integer >= {minimum}")


# ---------------------------------------------------------------- sections

@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a Megatron learning-rate schedule (`fnllama.optim.make_schedule`)."""
    lr: float = 3e-4                      # peak learning rate
    min_lr: float = 0.0                   # floor of the decay
    lr_decay_style: str = "cosine"        # constant | linear | cosine
    lr_warmup_iters: int | None = None    # linear warmup steps (or lr_warmup_fraction)
    lr_warmup_fraction: float | None = None  # warmup as a fraction of lr_decay_iters
    lr_decay_iters: int | None = None     # default: train_iters
    weight_decay: float = 0.1             # decoupled; norms and biases exempt
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float | None = 1.0         # max global grad norm; None or 0 disables clipping

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr}: expected a positive learning rate")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr {self.min_lr}: expected 0 <= --min-lr <= --lr {self.lr}")
        if self.lr_decay_style not in DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {self.lr_decay_style!r}: expected one of {', '.join(DECAY_STYLES)}")
        if self.lr_warmup_iters is not None and self.lr_warmup_fraction is not None:
            raise ConfigError(f"--lr-warmup-iters {self.lr_warmup_iters} and --lr-warmup-fraction "
                              f"{self.lr_warmup_fraction}: give one of them, not both")
        _positive(self, "lr_warmup_iters", minimum=0)
        _positive(self, "lr_decay_iters")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction < 1:
            raise ConfigError(f"--lr-warmup-fraction {self.lr_warmup_fraction}: expected a number in [0, 1)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} {getattr(self, name)}: expected a number in [0, 1)")
        if not self.adam_eps > 0 or self.weight_decay < 0:
            raise ConfigError(f"--adam-eps {self.adam_eps} must be > 0 and --weight-decay "
                              f"{self.weight_decay} >= 0")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError(f"--clip-grad {self.clip_grad}: expected >= 0 (0 disables clipping)")


@dataclass(frozen=True)
class DataConfig:
    """Megatron indexed datasets (`fnllama preprocess` output) and how to split them.

    `data_path` is Megatron's `--data-path`: one prefix (`.../alpaca_text_document`), or a
    blend `("0.7", "a_text_document", "0.3", "b_text_document")` of weights and prefixes.
    """
    data_path: tuple[str, ...] = ()
    split: str = "969,30,1"               # train,valid,test weights
    tokenizer_type: str | None = None     # only to check the vocabulary against the model
    tokenizer_model: str | None = None    # sentencepiece .model file or HF tokenizer directory
    eod_mask_loss: bool = False           # no loss on the label that starts the next document

    def __post_init__(self) -> None:
        if isinstance(self.data_path, str):
            object.__setattr__(self, "data_path", tuple(self.data_path.split()))
        object.__setattr__(self, "data_path", tuple(str(p) for p in self.data_path))
        if len(self.data_path) > 1:
            self.blend()                   # validates the weight/prefix pairs
        parts = self.split.replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or not weights[0] > 0:
            raise ConfigError(f"--split {self.split!r}: expected up to three non-negative weights "
                              f"train,valid,test with train > 0, e.g. 969,30,1")

    def blend(self) -> tuple[list[str], list[float]]:
        """(prefixes, weights): one prefix has weight 1; otherwise `w1 p1 w2 p2 ...`."""
        if len(self.data_path) == 1:
            return list(self.data_path), [1.0]
        if len(self.data_path) % 2:
            raise ConfigError(f"--data-path {' '.join(self.data_path)}: expected one prefix or pairs "
                              f"'WEIGHT PREFIX WEIGHT PREFIX ...'")
        weights, prefixes = self.data_path[0::2], list(self.data_path[1::2])
        try:
            values = [float(w) for w in weights]
        except ValueError:
            raise ConfigError(f"--data-path {' '.join(self.data_path)}: blend weights {list(weights)} "
                              f"must be numbers ('WEIGHT PREFIX WEIGHT PREFIX ...')") from None
        if any(w < 0 for w in values) or not sum(values) > 0:
            raise ConfigError(f"--data-path: blend weights {values} must be >= 0 with a positive sum")
        return prefixes, values


@dataclass(frozen=True)
class ParallelConfig:
    """How many processes, and how the state is laid out over them (axis `dp`)."""
    dp: int | None = None                 # data-parallel size; default nproc_per_node * nnodes
    zero_stage: int = 0                   # 0 replicated, 1 optimizer state, 2 + gradients, 3 + params
    nproc_per_node: int = 1               # processes per node (torchrun --nproc-per-node)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout_s: float = 600.0              # collective timeout: a dead rank fails, never hangs

    def __post_init__(self) -> None:
        _positive(self, "dp", "nproc_per_node", "nnodes")
        _positive(self, "node_rank", minimum=0)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage {self.zero_stage!r}: expected 0, 1, 2 or 3")
        if self.node_rank >= self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank}: expected < --nnodes {self.nnodes}")
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port {self.master_port}: expected a port in 1..65535")
        if self.dp is not None and self.launched > 1 and self.dp != self.launched:
            raise ConfigError(f"--dp {self.dp} differs from --nproc-per-node {self.nproc_per_node} x "
                              f"--nnodes {self.nnodes} = {self.launched}")

    @property
    def launched(self) -> int:
        """Processes the launcher starts: nproc_per_node x nnodes."""
        return self.nproc_per_node * self.nnodes

    @property
    def dp_size(self) -> int:
        """The data-parallel size: `dp` when given (e.g. under an outer torchrun), else `launched`."""
        return self.dp if self.dp is not None else self.launched


@dataclass(frozen=True)
class TrainConfig:
    """The loop: batch shape, length, precision, logging and checkpoints."""
    seq_length: int = 128
    micro_batch_size: int = 8             # sequences per forward/backward on one device
    global_batch_size: int | None = None  # sequences per update; default micro x dp (no accumulation)
    train_iters: int = 100
    precision: str = "fp32"               # fp32 | bf16 | fp16 (fp16: dynamic loss scaling)
    recompute: str = "none"               # activation recompute: none | selective | full
    seed: int = 1234
    log_interval: int = 10
    output_dir: str = "runs/train"        # config.json and metrics.jsonl go here
    save: str | None = None               # checkpoint directory
    save_interval: int | None = None      # steps between checkpoints (default: only at the end)
    load: str | None = None               # restore the latest committed step from this directory
    load_step: int | None = None          # ... or this step
    resume: bool = False                  # restore from `save` when it holds a checkpoint
    init_from_hf: str | None = None       # start from an HF LLaMA directory's weights
    skip_nan: bool = False                # skip (and count) non-finite steps instead of raising
    compile: bool = False                 # torch.compile the loss (eager fallback)
    peak_tflops: float | None = None      # device peak for MFU (default: table / measured)

    def __post_init__(self) -> None:
        _positive(self, "seq_length", "micro_batch_size", "global_batch_size", "train_iters",
                  "log_interval", "save_interval")
        _positive(self, "seed", "load_step", minimum=0)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: expected one of {PRECISIONS} (--bf16, --fp16)")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"--recompute {self.recompute!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
        if self.resume and not self.save:
            raise ConfigError("--resume restores from the --save directory: pass --save DIR too "
                              "(or --load DIR to restore from another directory)")
        if self.save_interval and not self.save:
            raise ConfigError(f"--save-interval {self.save_interval}: pass --save DIR to say where checkpoints go")
        if self.load_step is not None and not (self.load or self.resume):
            raise ConfigError(f"--load-step {self.load_step}: pass --load DIR (or --resume) too")
        if self.init_from_hf and (self.load or self.resume):
            raise ConfigError("--init-from-hf starts a new run from HF weights; it cannot be combined "
                              "with --load/--resume (a checkpoint already holds the weights)")


# ---------------------------------------------------------------- the experiment

@dataclass(frozen=True)
class ExperimentConfig:
    """One run: the model and the four sections, checked against each other."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "train"

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelConfig), ("optim", OptimConfig), ("data", DataConfig),
                          ("parallel", ParallelConfig), ("train", TrainConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"ExperimentConfig.{name}: expected a {cls.__name__}, "
                                  f"got {type(getattr(self, name)).__name__}")
        check_batch(self.train, self.parallel.dp_size)
        t, m = self.train, self.model
        if t.seq_length > m.max_seq_len:
            raise ConfigError(f"--seq-length {t.seq_length} exceeds the model's max_seq_len {m.max_seq_len}; "
                              f"pass --max-position-embeddings {t.seq_length} (or a shorter --seq-length)")
        if self.parallel.zero_stage == 3 and t.recompute != "none":
            raise ConfigError(f"--zero-stage 3 with --recompute {t.recompute}: not supported (stage 3 "
                              "re-gathers weights in backward itself); use --recompute none or stage 1/2")
        if self.parallel.zero_stage == 3 and (t.save or t.load or t.resume):
            raise ConfigError("--zero-stage 3 runs cannot be checkpointed yet; "
                              "drop --save/--load/--resume or use --zero-stage 1 or 2")
        decay = self.optim.lr_decay_iters or t.train_iters
        warmup = self.optim.lr_warmup_iters or (self.optim.lr_warmup_fraction or 0) * decay
        if self.optim.lr_decay_style != "constant" and not warmup < decay:
            raise ConfigError(f"--lr-warmup-iters {warmup:g} must be < --lr-decay-iters {decay} "
                              f"(default --train-iters) for --lr-decay-style {self.optim.lr_decay_style}")

    @property
    def global_batch_size(self) -> int:
        return self.train.global_batch_size or self.train.micro_batch_size * self.parallel.dp_size

    def grad_accum_steps(self, dp: int | None = None) -> int:
        """Micro-batches per step on each rank: global / (micro x dp)."""
        dp = self.parallel.dp_size if dp is None else dp
        gbs = self.train.global_batch_size or self.train.micro_batch_size * dp
        return gbs // (self.train.micro_batch_size * dp)

    def replace(self, **sections: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        sections = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig,
                    "parallel": ParallelConfig, "train": TrainConfig}
        unknown = set(d) - set(sections) - {"name"}
        if unknown:
            raise ConfigError(f"experiment config: unknown section(s) {sorted(unknown)}")
        kwargs: dict[str, Any] = {"name": d.get("name", "train")}
        for name, section in sections.items():
            values = dict(d.get(name, {}))
            known = {f.name for f in dataclasses.fields(section)}
            if set(values) - known:
                raise ConfigError(f"experiment config [{name}]: unknown field(s) {sorted(set(values) - known)}")
            if name == "data" and "data_path" in values:
                values["data_path"] = tuple(values["data_path"])
            kwargs[name] = section(**values)
        return cls(**kwargs)


def check_batch(train: TrainConfig, dp: int) -> None:
    """Global batch must be a whole number of (micro-batch x dp) passes."""
    if train.global_batch_size is None:
        return
    per_pass = train.micro_batch_size * dp
    if train.global_batch_size % per_pass:
        raise ConfigError(f"--global-batch-size {train.global_batch_size} is not divisible by "
                          f"--micro-batch-size {train.micro_batch_size} x dp {dp} = {per_pass}")


def save_json(exp: ExperimentConfig, path: str | os.PathLike) -> str:
    """Write the resolved config as JSON (atomically); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(exp.to_json() + "\n")
    os.replace(tmp, path)
    return path


def load_json(path: str | os.PathLike) -> ExperimentConfig:
    try:
        with open(path) as f:
            return ExperimentConfig.from_dict(json.load(f))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_experiment_file(path: str | os.PathLike) -> ExperimentConfig:
    """Import a Python experiment file and return its `get_config()`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file; expected a Python file defining get_config()")
    if path.endswith(".json"):
        return load_json(path)
    name = "fnllama_experiment_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--config {path}: not a Python file (expected experiments/NAME.py with get_config())")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of user code is a config error, named
        raise ConfigError(f"--config {path}: importing it failed: {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"--config {path}: defines no get_config() function returning an ExperimentConfig")
    try:
        exp = get_config()
    except ConfigError as e:
        raise ConfigError(f"--config {path}: get_config(): {e}") from e
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--config {path}: get_config() raised {type(e).__name__}: {e}") from e
    if not isinstance(exp, ExperimentConfig):
        raise ConfigError(f"--config {path}: get_config() returned a {type(exp).__name__}, "
                          f"expected fnllama.experiment.ExperimentConfig")
    return exp
