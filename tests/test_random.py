import subprocess
import sys

import pytest
import torch

from fnllama import config, model
from fnllama import random as fr
from fnllama.tree import paths_and_leaves


def test_threefry_known_answers():
    # Random123 known-answer vectors for Threefry-2x32, 20 rounds.
    assert fr.threefry2x32((0, 0), (0, 0)) == (0x6B200159, 0x99BA4EFE)
    assert fr.threefry2x32((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 2) == (0x1CB996FC, 0xBB002BE7)
    assert fr.threefry2x32((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3)) == (0xC4923A9C, 0x483DF7A0)


def test_split_and_fold_in_are_distinct_and_deterministic():
    k = fr.key(42)
    children = fr.split(k, 4)
    assert children.shape == (4, 2)
    assert len({tuple(c.tolist()) for c in children}) == 4
    assert torch.equal(fr.split(k, 4), children)
    assert torch.equal(fr.fold_in(k, 7), fr.fold_in(k, 7))
    assert not torch.equal(fr.fold_in(k, 7), fr.fold_in(k, 8))
    assert not any(torch.equal(fr.fold_in(k, i), children[i]) for i in range(4))
    assert not torch.equal(fr.key(1), fr.key(2))


def test_samplers_ignore_global_rng_and_threads():
    k = fr.key(3)
    torch.manual_seed(0)
    a = fr.normal(k, (1000,))
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = fr.normal(k, (1000,))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    assert abs(a.mean().item()) < 0.15 and abs(a.std().item() - 1) < 0.1
    u = fr.uniform(k, (1000,), minval=-2, maxval=3)
    assert u.min() >= -2 and u.max() < 3
    r = fr.randint(k, (1000,), 5, 9)
    assert set(r.unique().tolist()) == {5, 6, 7, 8}
    m = fr.bernoulli(k, 0.25, (4000,))
    assert m.dtype == torch.bool and 0.2 < m.float().mean().item() < 0.3
    assert sorted(fr.permutation(k, 10).tolist()) == list(range(10))
    assert fr.normal(k, (4,), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_key_is_a_clear_error():
    with pytest.raises(ValueError, match="PRNG key"):
        fr.normal(torch.zeros(3, dtype=torch.int64), (2,))
    with pytest.raises(ValueError, match="seed"):
        fr.key(-1)


_DIGEST = """
import hashlib, sys, torch
from fnllama import config, model, random as fr
torch.set_num_threads(int(sys.argv[2]))
params = model.init(fr.key(int(sys.argv[1])), config.get_preset("tiny"))
h = hashlib.sha256()
from fnllama.tree import paths_and_leaves
for path, leaf in paths_and_leaves(params):
    h.update(path.encode()); h.update(leaf.numpy().tobytes())
print(h.hexdigest())
"""


def _digest(seed: int, threads: int) -> str:
    out = subprocess.run([sys.executable, "-c", _DIGEST, str(seed), str(threads)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_same_key_same_params_across_processes_and_thread_counts():
    assert _digest(0, 1) == _digest(0, 2)
    assert _digest(0, 2) != _digest(1, 2)


def test_init_in_process_matches_itself_and_key_changes_everything():
    cfg = config.get_preset("tiny")
    a, b = model.init(fr.key(5), cfg), model.init(fr.key(5), cfg)
    c = model.init(fr.key(6), cfg)
    for (path, x), (_, y), (_, z) in zip(paths_and_leaves(a), paths_and_leaves(b), paths_and_leaves(c)):
        assert torch.equal(x, y), path
        if "norm" not in path:
            assert not torch.equal(x, z), path
