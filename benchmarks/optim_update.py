"""Time one AdamW update: fnllama.optim (pure, new tensors) vs torch.optim.AdamW(foreach=True).

Usage: PYTHONPATH=. python benchmarks/optim_update.py [--params 50e6] [--leaves 100]
       [--repeats 10] [--tune-malloc] [--compile]
Both sides use fp32 params/state on CPU and the same constant lr. fnllama's step is
`update` + `apply_updates` (allocates new params, moments and intermediates); torch's is
`optimizer.step()` in place. The two are timed interleaved (shared-machine noise hits
both) and the median milliseconds per update are printed.

On CPU the pure version's cost is mostly glibc handing freed blocks back to the OS and
page-faulting fresh ones on the next step; `--tune-malloc` raises glibc's mmap/trim
thresholds (what MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ do) so blocks are reused.
`--compile` also times the update compiled with inductor (one fused loop per leaf).
"""

import argparse
import ctypes
import statistics
import time

import torch

from fnllama import optim


def make_tree(total: int, leaves: int) -> dict:
    n = total // leaves
    g = torch.Generator().manual_seed(0)
    return {f"w{i:03d}": torch.randn(n // 512, 512, generator=g) for i in range(leaves)}


def tune_glibc_malloc() -> None:
    """Keep freed blocks in the heap instead of returning them to the OS."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def time_interleaved(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()  # warm up (first-touch allocations, compilation)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--leaves", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tune-malloc", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.tune_malloc:
        tune_glibc_malloc()
    params = make_tree(int(args.params), args.leaves)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    numel = sum(v.numel() for v in params.values())

    opt = optim.adamw(1e-3, weight_decay=0.1)

    def pure_step(params, state):
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    fns = {"fnllama.optim.adamw update+apply": _looped(pure_step, params, opt.init(params))}
    if args.compile:
        compiled = torch.compile(pure_step, fullgraph=True, dynamic=False)
        fns["fnllama.optim.adamw, torch.compile"] = _looped(compiled, params, opt.init(params))
    ref_params = [torch.nn.Parameter(v.clone()) for v in params.values()]
    for p, g in zip(ref_params, grads.values()):
        p.grad = g
    fns["torch.optim.AdamW(foreach) step"] = torch.optim.AdamW(ref_params, lr=1e-3, weight_decay=0.1, foreach=True).step

    ms = time_interleaved(fns, args.repeats)
    torch_ms = ms["torch.optim.AdamW(foreach) step"]
    print(f"params={numel / 1e6:.1f}M leaves={args.leaves} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} tune_malloc={args.tune_malloc}")
    for name, t in ms.items():
        print(f"{name:38s} {t:9.1f} ms   torch/this = {torch_ms / t:.2f}")


def _looped(step, params, state):
    box = {"params": params, "state": state}

    def run():
        box["params"], box["state"] = step(box["params"], box["state"])

    return run


if __name__ == "__main__":
    main()
