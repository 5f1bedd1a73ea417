import pytest
import torch

from fnllama import config, model
from fnllama import random as fr
from fnllama.tree import paths_and_leaves


@pytest.fixture(scope="module")
def setup():
    cfg = config.get_preset("tiny")
    params = model.init(fr.key(0), cfg)
    tokens = fr.randint(fr.key(1), (2, 24), 0, cfg.vocab_size)
    return cfg, params, tokens


def test_shapes_and_init_scales(setup):
    cfg, params, tokens = setup
    assert model.forward(params, tokens, cfg).shape == (2, 24, cfg.vocab_size)
    layer0 = params["layers"][0]
    assert layer0["attn"]["wk"].shape == (cfg.n_kv_heads * cfg.head_dim, cfg.dim)
    assert torch.equal(layer0["attn_norm"], torch.ones(cfg.dim))
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    assert abs(layer0["mlp"]["w_down"].std().item() - out_std) < 0.2 * out_std
    assert abs(layer0["mlp"]["w_up"].std().item() - cfg.init_std) < 0.1 * cfg.init_std


def test_causal(setup):
    cfg, params, tokens = setup
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % cfg.vocab_size
    a, b = model.forward(params, tokens, cfg), model.forward(params, changed, cfg)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_packed_segments_equal_separate_documents(setup):
    cfg, params, tokens = setup
    doc_a, doc_b = tokens[:1, :10], tokens[:1, 10:]
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    segments = torch.cat([torch.zeros(10), torch.ones(14)]).long()[None]
    out = model.forward(params, packed, cfg, positions=positions, segment_ids=segments)
    torch.testing.assert_close(out[:, :10], model.forward(params, doc_a, cfg), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 10:], model.forward(params, doc_b, cfg), rtol=1e-5, atol=1e-5)


def test_loss_mask_and_count(setup):
    cfg, params, tokens = setup
    labels = tokens.roll(-1, 1)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -1] = 0
    full, n_full = model.loss(params, {"tokens": tokens, "labels": labels}, cfg)
    masked, n = model.loss(params, {"tokens": tokens, "labels": labels, "loss_mask": mask}, cfg)
    assert n_full.item() == 48 and n.item() == 46
    assert abs(full.item() - masked.item()) > 1e-6
    assert abs(full.item() - torch.log(torch.tensor(cfg.vocab_size)).item()) < 0.5


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_gives_equal_gradients(setup, recompute):
    cfg, params, tokens = setup
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1)}

    def grads(mode):
        leaves = {p: t.detach().requires_grad_() for p, t in paths_and_leaves(params)}
        tree = model.init(fr.key(0), cfg)  # same structure; swap in the grad-tracking leaves
        import optree
        tree = optree.tree_unflatten(optree.tree_structure(tree), list(leaves.values()))
        loss, _ = model.loss(tree, batch, cfg, recompute=mode)
        return torch.autograd.grad(loss, list(leaves.values()))

    for a, b in zip(grads("none"), grads(recompute)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_torch_func_grad_matches_autograd(setup):
    cfg, params, tokens = setup
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1)}
    g, value = torch.func.grad_and_value(lambda p: model.loss(p, batch, cfg)[0])(params)
    w = params["layers"][1]["mlp"]["w_gate"].detach().requires_grad_()
    swapped = {**params, "layers": [params["layers"][0], {**params["layers"][1],
                                                          "mlp": {**params["layers"][1]["mlp"], "w_gate": w}}]}
    model.loss(swapped, batch, cfg)[0].backward()
    torch.testing.assert_close(g["layers"][1]["mlp"]["w_gate"], w.grad, rtol=1e-6, atol=1e-9)


def test_bf16_forward_runs(setup):
    cfg, params, tokens = setup
    p16 = {k: v for k, v in params.items()}
    import optree
    p16 = optree.tree_map(lambda t: t.to(torch.bfloat16), params)
    out = model.forward(p16, tokens, cfg)
    assert out.dtype == torch.bfloat16
    ref = model.forward(params, tokens, cfg)
    assert (out.float() - ref).abs().max() < 0.1
