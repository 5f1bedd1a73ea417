"""fnllama.device: CPU discovery for real, the NPU path through a torch_npu test double.

No NPU is here, so a fake `torch_npu` stands in: in-process (a module in sys.modules plus
a fake `torch.npu` namespace) for kind/backend/dtype decisions, and as an importable
package in a subprocess for device strings, because `torch.device("npu:1")` only parses
after the privateuse1 backend is renamed to "npu" (as torch_npu does), which cannot be
undone inside the pytest process.
"""

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from fnllama import device
from fnllama.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
needs_plain_cpu = pytest.mark.skipif(
    torch.cuda.is_available() or hasattr(torch, "npu"), reason="this machine has an accelerator"
)


@pytest.fixture
def fake_npu(monkeypatch):
    """torch_npu importable and torch.npu saying it is available; returns the namespace."""
    npu = types.SimpleNamespace(is_available=lambda: True, is_bf16_supported=lambda: True)
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return npu


@needs_plain_cpu
def test_cpu_machine(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device.device_type() == "cpu"
    assert device.backend() == "gloo"
    assert device.local_device() == torch.device("cpu")  # one CPU device, whatever the rank
    assert device.describe()["backend"] == "gloo"
    assert torch.bfloat16 in device.supported_dtypes()
    assert device.check_dtype(torch.bfloat16) is torch.bfloat16


def test_fake_npu_is_chosen_with_hccl(fake_npu):
    assert device.device_type() == "npu"
    assert device.backend() == "hccl"
    assert device.supported_dtypes() == (torch.float32, torch.bfloat16, torch.float16)


def test_npu_without_bf16_rejects_bf16(fake_npu):
    fake_npu.is_bf16_supported = lambda: False
    with pytest.raises(ConfigError, match="bfloat16 is not supported on npu"):
        device.check_dtype(torch.bfloat16)


@needs_plain_cpu
def test_unavailable_npu_falls_back_to_cpu(fake_npu):
    fake_npu.is_available = lambda: False
    assert device.device_type() == "cpu"


@needs_plain_cpu
def test_broken_torch_npu_warns_and_falls_back(tmp_path, monkeypatch):
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('libascendcl.so: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.warns(UserWarning, match="libascendcl.so"):
        assert device.device_type() == "cpu"


def test_backend_names_and_unknown_kind():
    assert [device.backend(k) for k in ("npu", "cuda", "cpu")] == ["hccl", "nccl", "gloo"]
    with pytest.raises(ConfigError, match="'tpu' is not one of"):
        device.backend("tpu")


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_bad_local_rank_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("LOCAL_RANK", value)
    with pytest.raises(ConfigError, match=f"LOCAL_RANK={value!r}"):
        device.local_rank()


def test_local_rank_defaults_to_zero(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert device.local_rank() == 0


def test_cpu_memory_and_sync():
    cpu = torch.device("cpu")
    device.synchronize(cpu)
    device.empty_cache(cpu)
    device.reset_peak_memory(cpu)
    resident = torch.ones(2**25)  # 128 MiB, written, so resident: the peak is in bytes and >= it
    peak = device.peak_memory_bytes(cpu)
    assert resident.numel() * 4 < peak < 1 << 40


FAKE_TORCH_NPU = '''
"""A stand-in for torch_npu: registers the "npu" device name and a torch.npu that records calls."""
import torch

calls = []
torch.utils.rename_privateuse1_backend("npu")
npu = type(torch)("torch.npu")
npu.is_available = lambda: True
npu.is_bf16_supported = lambda: True
npu.set_device = lambda d: calls.append(("set_device", str(d)))
npu.synchronize = lambda d=None: calls.append(("synchronize", str(d)))
npu.max_memory_allocated = lambda d=None: calls.append(("max_memory_allocated", str(d))) or 12345
npu.reset_peak_memory_stats = lambda d=None: calls.append(("reset_peak_memory_stats", str(d)))
npu.empty_cache = lambda: calls.append(("empty_cache",))
torch._register_device_module("npu", npu)
'''

NPU_PROBE = '''
import json, torch_npu
from fnllama import device
d = device.set_device()
device.synchronize(d)
peak = device.peak_memory_bytes()
device.reset_peak_memory(d)
device.empty_cache(d)
print(json.dumps({"describe": device.describe(), "device": str(d), "peak": peak,
                  "calls": torch_npu.calls}))
'''


def test_fake_torch_npu_package_gives_npu_rank_device(tmp_path):
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(textwrap.dedent(FAKE_TORCH_NPU))
    env = dict(os.environ, LOCAL_RANK="1", PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    run = subprocess.run([sys.executable, "-c", NPU_PROBE], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["device"] == "npu:1"
    assert got["describe"] == {"device_type": "npu", "backend": "hccl", "device": "npu:1",
                               "local_rank": 1, "dtypes": ["float32", "bfloat16", "float16"]}
    assert got["peak"] == 12345
    assert [tuple(c) for c in got["calls"]] == [
        ("set_device", "npu:1"), ("synchronize", "npu:1"), ("max_memory_allocated", "npu:1"),
        ("reset_peak_memory_stats", "npu:1"), ("empty_cache",)]
