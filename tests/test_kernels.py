"""The kernel dispatch picks torch_npu's fused ops on (fake) NPU tensors and the reference elsewhere.

torch_npu is not installed here, so a test double stands in: a module whose npu_* functions
record their calls and compute the reference math with the argument layout torch_npu documents.
"""

import math
import types

import pytest
import torch
import torch.nn.functional as F

from fnllama import config, kernels, model
from fnllama import random as fr


class FakeTorchNpu(types.ModuleType):
    def __init__(self):
        super().__init__("torch_npu")
        self.calls: list[str] = []

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append("npu_rms_norm")
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
        return gamma * (x32 * rstd).to(x.dtype), rstd

    def npu_rotary_mul(self, x, r1, r2):
        self.calls.append("npu_rotary_mul")
        assert x.ndim == 4 and r1.shape[-1] == x.shape[-1] and r1.shape[2] == 1  # BSND, tables [B,S,1,D]
        x1, x2 = x.chunk(2, dim=-1)
        return x * r1 + torch.cat([-x2, x1], dim=-1) * r2

    def npu_swiglu(self, x, dim=-1):
        self.calls.append("npu_swiglu")
        a, b = x.chunk(2, dim=dim)
        return F.silu(a) * b

    def npu_fusion_attention(self, q, k, v, head_num, input_layout, *, atten_mask=None, scale=1.0,
                             keep_prob=1.0, sparse_mode=0, **_):
        self.calls.append("npu_fusion_attention")
        assert input_layout == "BSND" and q.shape[2] == head_num and keep_prob == 1.0
        T = q.shape[1]
        if sparse_mode == 2:   # compressed 2048x2048 causal mask; expand to T x T
            assert atten_mask.shape == (2048, 2048)
            allowed = ~atten_mask[:T, :T]
        else:
            allowed = ~atten_mask
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
        scores = (qh @ kh.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = scores.softmax(-1) @ vh
        return out.transpose(1, 2), None, None, None, 0, 0, 0


@pytest.fixture
def fake_npu(monkeypatch):
    fake = FakeTorchNpu()
    monkeypatch.setattr(kernels, "_npu_module", lambda: fake)
    monkeypatch.setattr(kernels, "_on_npu", lambda x: True)
    return fake


def _logits_and_grads(segment_ids=None):
    cfg = config.get_preset("tiny")
    params = model.init(fr.key(0), cfg)
    tokens = fr.randint(fr.key(1), (2, 16), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "segment_ids": segment_ids}
    grads, value = torch.func.grad_and_value(lambda p: model.loss(p, batch, cfg)[0])(params)
    return model.forward(params, tokens, cfg, segment_ids=segment_ids), grads["layers"][0]["attn"]["wq"]


def test_reference_ops_on_cpu():
    assert kernels._npu_for(torch.zeros(1)) is None


@pytest.mark.parametrize("packed", [False, True])
def test_fake_npu_chooses_every_fused_op_with_equal_results(fake_npu, monkeypatch, packed):
    segments = torch.tensor([[0] * 6 + [1] * 10, [0] * 16]) if packed else None
    npu_logits, npu_grad = _logits_and_grads(segments)
    assert set(fake_npu.calls) == {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_fusion_attention"}
    monkeypatch.setattr(kernels, "_on_npu", lambda x: False)
    fake_npu.calls.clear()
    ref_logits, ref_grad = _logits_and_grads(segments)
    assert fake_npu.calls == []
    torch.testing.assert_close(npu_logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(npu_grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_reference_attention_equals_explicit_softmax():
    q, k, v = (fr.normal(fr.key(i), (2, 8, h, 16)) for i, h in ((0, 4), (1, 2), (2, 2)))
    out = kernels.attention(q, k, v)
    kh, vh = (t.transpose(1, 2).repeat_interleave(2, 1) for t in (k, v))
    scores = q.transpose(1, 2) @ kh.transpose(-1, -2) / math.sqrt(16)
    scores = scores.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(out, (scores.softmax(-1) @ vh).transpose(1, 2), rtol=1e-5, atol=1e-6)
