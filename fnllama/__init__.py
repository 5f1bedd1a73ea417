"""fnllama: a JAX-style functional LLaMA trainer on PyTorch.

    import fnllama as fl
    cfg = fl.config.get_preset("tiny")
    key = fl.random.key(0)
    optimizer = fl.optim.adamw(fl.optim.make_schedule("cosine", lr=3e-4, warmup_iters=100, decay_iters=1000))
    state = fl.train.init_state(key, cfg, optimizer)
    step = fl.train.make_train_step(cfg, optimizer, compute_dtype=torch.bfloat16)
    state, metrics = step(state, batch)

Submodules are the API: `random`, `tree`, `config`, `model`, `kernels`, `optim`, `train`,
`mesh`, `zero`, `checkpoint`, `hf`, `metrics`, `compare`, `plan`, `data`. They are imported
lazily, so `import fnllama` is cheap (orbax and transformers load only when used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("random", "tree", "config", "model", "kernels", "optim", "train", "device", "mesh", "zero",
               "checkpoint", "hf", "metrics", "compare", "plan", "data", "errors")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"fnllama.{name}")
    raise AttributeError(f"module 'fnllama' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_SUBMODULES, "__version__"])
