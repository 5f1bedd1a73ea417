"""fnllama.optim against torch.optim references, plus purity, dtype and schedule checks."""


import optree
import pytest
import torch

from fnllama import optim, tree

# ---------------------------------------------------------------- fixtures


def make_params(dtype=torch.float32, seed=0):
    """A small LLaMA-shaped tree: 2-D weights, 1-D norm scales, a list of layers."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    layer = lambda: {"attn_norm": 1 + 0.1 * r(8), "attn": {"wq": r(8, 8), "wo": r(8, 8)}, "mlp": {"w_up": r(12, 8)}}
    return {"embed": r(16, 8), "layers": [layer(), layer()], "final_norm": 1 + 0.1 * r(8)}


def make_grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return optree.tree_map(lambda p: scale * torch.randn(p.shape, generator=g).to(p.dtype), params)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_trees_close(actual, expected, rtol):
    for (path, a), (_, e) in zip(tree.paths_and_leaves(actual), tree.paths_and_leaves(expected), strict=True):
        assert rel_err(a, e) <= rtol, f"{path}: relative error {rel_err(a, e):.3g} > {rtol}"


def clone_tree(t):
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t)


def assert_trees_equal(a, b):
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert torch.equal(x, y)


def run_fn(opt, params, steps, grad_scale=1.0):
    state = opt.init(params)
    for step in range(steps):
        updates, state = opt.update(make_grads(params, step, grad_scale), state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def run_torch(make_opt, params, steps, make_sched=None, grad_scale=1.0):
    """Trains leaves of `params` (in tree order) with a torch optimizer and the same grads."""
    leaves, spec = optree.tree_flatten(clone_tree(params))
    leaves = [torch.nn.Parameter(x) for x in leaves]
    opt = make_opt(leaves)
    sched = make_sched(opt) if make_sched else None
    for step in range(steps):
        for p, g in zip(leaves, optree.tree_leaves(make_grads(params, step, grad_scale))):
            p.grad = g
        opt.step()
        if sched:
            sched.step()
    return optree.tree_unflatten(spec, [p.detach() for p in leaves])


TRANSFORMS = {
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.1, mask=optim.default_decay_mask),
    "adamw_sched": lambda: optim.adamw(optim.warmup_cosine(1e-2, 3, 20, 1e-3)),
    "sgd": lambda: optim.sgd(0.1),
    "sgd_nesterov_wd": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "clip": lambda: optim.clip_by_global_norm(1.0),
    "scale_by_adam": lambda: optim.scale_by_adam(),
    "trace": lambda: optim.trace(0.9),
    "decay": lambda: optim.add_decayed_weights(0.1, optim.default_decay_mask),
    "schedule": lambda: optim.scale_by_schedule(optim.warmup_linear(1.0, 2, 10)),
    "chain": lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-3)),
}

# ---------------------------------------------------------------- against torch.optim


@pytest.mark.parametrize("masked", [False, True])
def test_adamw_matches_torch_adamw_with_schedule(masked):
    params = make_params()
    lr, steps = 1e-2, 30
    sched = optim.warmup_cosine(lr, warmup_steps=5, decay_steps=25, min_lr=1e-3)  # covers all three phases
    mask = optim.default_decay_mask if masked else None
    ours, state = run_fn(optim.adamw(sched, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, mask=mask), params, steps)

    def make_opt(leaves):
        if not masked:
            return torch.optim.AdamW(leaves, lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
        decay = optree.tree_leaves(optim.default_decay_mask(params))
        groups = [{"params": [p for p, d in zip(leaves, decay) if d], "weight_decay": 0.1},
                  {"params": [p for p, d in zip(leaves, decay) if not d], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.8, 0.95), eps=1e-6, foreach=False)

    ref = run_torch(make_opt, params, steps, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: sched(s) / lr))
    assert_trees_close(ours, ref, 1e-6)
    assert state[0].count.item() == steps and state[2].count.item() == steps
    # The params really moved, and the mask really mattered for the norms.
    assert rel_err(ours["embed"], params["embed"]) > 1e-3
    assert_trees_close(ours, run_torch(make_opt, params, steps), 1.0)  # sanity: comparable size


def test_adamw_mask_changes_the_result():
    params = make_params()
    a, _ = run_fn(optim.adamw(1e-2, weight_decay=0.5), params, 5)
    b, _ = run_fn(optim.adamw(1e-2, weight_decay=0.5, mask=optim.default_decay_mask), params, 5)
    assert torch.equal(a["embed"], b["embed"])
    assert not torch.equal(a["final_norm"], b["final_norm"])


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.01)])
def test_sgd_matches_torch_sgd(momentum, nesterov, weight_decay):
    params = make_params()
    ours, _ = run_fn(optim.sgd(0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), params, 20)
    ref = run_torch(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, nesterov=nesterov,
                                               weight_decay=weight_decay), params, 20)
    assert_trees_close(ours, ref, 1e-6)


@pytest.mark.parametrize("grad_scale", [0.01, 10.0])  # below and above the threshold
def test_clip_by_global_norm_matches_torch(grad_scale):
    params = make_params()
    grads = make_grads(params, 0, grad_scale)
    holders = [torch.nn.Parameter(torch.zeros_like(g)) for g in optree.tree_leaves(grads)]
    for h, g in zip(holders, optree.tree_leaves(grads)):
        h.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(holders, max_norm=1.0)
    leaves = [h.grad for h in holders]
    norm = optim.global_norm(grads)
    assert abs(norm.item() - ref_norm.item()) <= 1e-6 * ref_norm.item()
    clipped, _ = optim.clip_by_global_norm(1.0).update(grads, optim.EmptyState())
    assert_trees_close(clipped, optree.tree_unflatten(optree.tree_structure(grads), leaves), 1e-7)
    assert (optim.global_norm(clipped).item() <= 1.0 + 1e-5) and (grad_scale < 1 or optim.global_norm(clipped) > 0.99)


def test_global_norm_of_bf16_accumulates_in_fp32():
    x = {"a": torch.full((4096,), 1.0, dtype=torch.bfloat16)}
    norm = optim.global_norm(x)
    assert norm.dtype == torch.float32 and norm.item() == 64.0


# ---------------------------------------------------------------- schedules


def test_schedule_hand_values():
    s = optim.warmup_cosine(1.0, warmup_steps=10, decay_steps=110, min_lr=0.1)
    assert s(0) == 0.0 and s(5) == 0.5 and s(10) == 1.0
    assert s(60) == pytest.approx(0.55, abs=1e-12)  # cosine mid-point: (lr + min_lr) / 2
    assert s(110) == pytest.approx(0.1, abs=1e-12) and s(111) == 0.1 and s(10_000) == 0.1
    lin = optim.warmup_linear(2.0, warmup_steps=0, decay_steps=100, min_lr=0.0)
    assert lin(0) == 2.0 and lin(25) == 1.5 and lin(100) == 0.0 and lin(500) == 0.0
    frac = optim.make_schedule("cosine", lr=1.0, min_lr=0.0, warmup_fraction=0.1, decay_iters=50)
    assert frac(5) == 1.0 and frac(2) == pytest.approx(0.4)
    const = optim.make_schedule("constant", lr=3.0, warmup_iters=4, decay_iters=None)
    assert const(2) == 1.5 and const(4) == 3.0 and const(10**6) == 3.0
    assert optim.constant(0.5)(7) == 0.5


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_schedule_tensor_path_matches_float_path_and_lambdalr(style):
    s = optim.make_schedule(style, lr=3e-4, min_lr=3e-5, warmup_iters=7, decay_iters=40)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    ref = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: s(step) / 3e-4)
    for step in range(50):  # ref's lr is the one the (step+1)-th optimizer.step() uses
        assert s(step) == pytest.approx(ref.get_last_lr()[0], rel=1e-12, abs=0)
        t = s(torch.tensor(step))
        assert t.dtype == torch.float32 and t.shape == ()
        assert t.item() == pytest.approx(s(step), rel=1e-6, abs=1e-12)
        opt.step()
        ref.step()


def test_schedule_rejects_bad_config():
    from fnllama.errors import ConfigError
    with pytest.raises(ConfigError, match="decay_iters > warmup"):
        optim.warmup_cosine(1.0, warmup_steps=10, decay_steps=10)
    with pytest.raises(ConfigError, match="not both"):
        optim.make_schedule("cosine", lr=1.0, warmup_iters=1, warmup_fraction=0.1, decay_iters=10)
    with pytest.raises(ConfigError, match="style must be one of"):
        optim.make_schedule("exp", lr=1.0, decay_iters=10)
    with pytest.raises(ConfigError, match="min_lr"):
        optim.make_schedule("linear", lr=1.0, min_lr=2.0, decay_iters=10)


# ---------------------------------------------------------------- properties of every transform


@pytest.mark.parametrize("name", TRANSFORMS)
def test_update_is_pure(name):
    opt = TRANSFORMS[name]()
    params = make_params()
    state = opt.init(params)
    _, state = opt.update(make_grads(params, 0), state, params)  # non-trivial old state
    grads = make_grads(params, 1)
    saved = clone_tree((params, grads, state))
    updates, new_state = opt.update(grads, state, params)
    new_params = optim.apply_updates(params, updates)
    assert_trees_equal((params, grads, state), saved)
    inputs = {x.untyped_storage().data_ptr() for x in optree.tree_leaves((params, grads, state))}
    for x in optree.tree_leaves((updates, new_state, new_params)):
        assert x.untyped_storage().data_ptr() not in inputs, "an output aliases an input"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_bf16_params_get_fp32_state_and_finite_updates(name):
    opt = TRANSFORMS[name]()
    params = make_params(torch.bfloat16)
    state = opt.init(params)
    for step in range(3):
        updates, state = opt.update(make_grads(params, step), state, params)
        params = optim.apply_updates(params, updates)
    for x in optree.tree_leaves(state):
        if x.dtype.is_floating_point:
            assert x.dtype == torch.float32
        else:
            assert x.dtype == torch.int64 and x.shape == () and x.item() == 3
    assert optree.tree_structure(updates) == optree.tree_structure(params)
    for u, p in zip(optree.tree_leaves(updates), optree.tree_leaves(params)):
        assert u.shape == p.shape and torch.isfinite(u).all()
        assert p.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["adamw", "sgd_nesterov_wd", "chain"])
def test_flat_buffers_with_tensor_mask_match_the_tree(name):
    """ZeRO view: the same optimizer on one padded flat fp32 buffer with a 0/1 multiplier mask."""
    mask_fn = optim.default_decay_mask
    make = {"adamw": lambda m: optim.adamw(1e-2, weight_decay=0.1, mask=m),
            "sgd_nesterov_wd": lambda m: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1, mask=m),
            "chain": lambda m: optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-3, mask=m))}[name]
    params = make_params()
    layout = tree.make_layout(params, pad_to=256)  # 600 elements -> 768: real padding
    flat = {"buf0": tree.flatten(params, layout)}
    flat_mask = {"buf0": tree.flatten(optim.mask_as_multipliers(mask_fn, params), layout)}
    tree_opt, flat_opt = make(mask_fn), make(flat_mask)
    tree_state, flat_state = tree_opt.init(params), flat_opt.init(flat)
    for step in range(5):
        grads = make_grads(params, step)
        u, tree_state = tree_opt.update(grads, tree_state, params)
        params = optim.apply_updates(params, u)
        fu, flat_state = flat_opt.update({"buf0": tree.flatten(grads, layout)}, flat_state, flat)
        flat = optim.apply_updates(flat, fu)
    assert_trees_close(tree.unflatten(flat["buf0"], layout), params, 1e-6)
    assert flat["buf0"][layout.total:].abs().max().item() == 0.0  # padding stays zero


def test_add_decayed_weights_accepts_bool_tree_and_tensor_leaves():
    params = {"a": torch.ones(3), "b": torch.ones(2)}
    upd = {"a": torch.zeros(3), "b": torch.zeros(2)}
    out, _ = optim.add_decayed_weights(0.5, {"a": True, "b": False}).update(upd, optim.EmptyState(), params)
    assert out["a"].tolist() == [0.5] * 3 and out["b"].tolist() == [0.0] * 2
    out, _ = optim.add_decayed_weights(0.5, {"a": torch.tensor([1.0, 0.0, 1.0]), "b": torch.tensor(True)}).update(
        upd, optim.EmptyState(), params)
    assert out["a"].tolist() == [0.5, 0.0, 0.5] and out["b"].tolist() == [0.5] * 2


def test_mask_key_order_does_not_matter():
    params = {"b": torch.ones(2), "a": torch.ones(2)}
    upd = {"a": torch.zeros(2), "b": torch.zeros(2)}
    out, _ = optim.add_decayed_weights(1.0, {"a": False, "b": True}).update(upd, optim.EmptyState(), params)
    assert out["a"].tolist() == [0.0, 0.0] and out["b"].tolist() == [1.0, 1.0]


def test_default_decay_mask_exempts_norms_and_optionally_embeddings():
    params = make_params()
    m = optim.default_decay_mask(params)
    assert m["embed"] and m["layers"][1]["attn"]["wq"] and not m["final_norm"] and not m["layers"][0]["attn_norm"]
    assert not optim.default_decay_mask(params, exempt_embeddings=True)["embed"]


# ---------------------------------------------------------------- readable errors


def test_chain_state_mismatch_is_readable():
    params = make_params()
    sgd_state = optim.sgd(0.1, momentum=0.9).init(params)
    with pytest.raises(ValueError, match=r"chain of 3 transforms \(scale_by_adam, add_decayed_weights, scale\)"
                                         r".*tuple of 2 \(TraceState, EmptyState\).*different optimizer"):
        optim.adamw(1e-3).update(make_grads(params, 0), sgd_state, params)
    swapped = optim.chain(optim.trace(0.9), optim.scale_by_adam()).init(params)
    with pytest.raises(ValueError, match="scale_by_adam: opt_state is TraceState, expected ScaleByAdamState"):
        optim.chain(optim.scale_by_adam(), optim.trace(0.9)).update(make_grads(params, 0), swapped, params)


def test_structure_mismatch_is_readable():
    params = make_params()
    opt = optim.adamw(1e-3, mask={"embed": True})
    with pytest.raises(ValueError, match=r"add_decayed_weights: mask at '<root>': expected \['embed', 'final_norm', "
                                         r"'layers'\] as in the params, found \['embed'\]"):
        opt.update(make_grads(params, 0), opt.init(params), params)
    bad = optim.default_decay_mask(params)
    bad["layers"][1]["attn"]["wq"] = "yes"
    with pytest.raises(ValueError, match=r"mask at 'layers.1.attn.wq': expected a bool or tensor, found str"):
        optim.adamw(1e-3, mask=bad).update(make_grads(params, 0), opt.init(params), params)
    with pytest.raises(ValueError, match="scale_by_adam: updates has structure"):
        opt.update({"embed": params["embed"]}, opt.init(params), params)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(make_grads(params, 0), opt.init(params))


# ---------------------------------------------------------------- torch.compile


def _compile_and_compare(backend):
    params = {"w": torch.randn(4, 4), "n": torch.ones(4)}
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.adamw(optim.warmup_cosine(1e-2, 2, 10), mask=optim.default_decay_mask))

    def step(params, grads, state):
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=backend)  # fullgraph: no breaks
    state_e = state_c = opt.init(params)
    pe = pc = params
    with torch._dynamo.config.patch(error_on_recompile=True):  # the count changes; the graph must not
        for i in range(4):
            grads = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(i)), "n": torch.full((4,), 0.1)}
            pe, state_e = step(pe, grads, state_e)
            pc, state_c = compiled(pc, grads, state_c)
    assert_trees_close(pc, pe, 1e-6)
    assert state_c[1][0].count.item() == 4 and not torch.equal(pc["w"], params["w"])


def test_adamw_update_traces_as_one_graph():
    _compile_and_compare("aot_eager")


@pytest.mark.slow
def test_adamw_update_compiles_with_inductor():
    _compile_and_compare("inductor")


@pytest.mark.parametrize("masked", [False, True])
def test_adamw_fused_apply_equals_chain_and_is_pure(masked):
    """adamw's fast path (torch's fused kernel) gives the chain's params and state, untouched inputs."""
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(16, 8, generator=gen), "norm": torch.ones(8), "emb": torch.randn(32, 8, generator=gen)}
    schedule = optim.make_schedule("cosine", lr=1e-2, min_lr=1e-3, warmup_iters=3, decay_iters=30)
    mask = optim.default_decay_mask if masked else None
    opt = optim.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=mask)
    assert opt.apply is not None
    fused_p, chain_p = params, params
    fused_s, chain_s = opt.init(params), opt.init(params)
    for step in range(30):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        scale = torch.tensor(0.5 + 0.01 * step)
        inputs = (grads, fused_s, fused_p)
        before = [t.clone() for t in optree.tree_leaves(inputs)]
        fused_p, fused_s = opt.apply(grads, fused_s, fused_p, scale)
        assert all(torch.equal(a, b) for a, b in zip(before, optree.tree_leaves(inputs)))   # pure
        updates, chain_s = opt.update(optree.tree_map(lambda g: g * scale, grads), chain_s, chain_p)
        chain_p = optim.apply_updates(chain_p, updates)
    assert optree.tree_structure(fused_s) == optree.tree_structure(chain_s)
    for a, b in zip(optree.tree_leaves((fused_p, fused_s)), optree.tree_leaves((chain_p, chain_s))):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(a, b)
    if masked:   # the norm scale is exempt from decay: with zero grads it would stay exactly 1
        zero = {k: torch.zeros_like(v) for k, v in params.items()}
        p2, _ = opt.apply(zero, opt.init(params), params, None)
        assert torch.equal(p2["norm"], params["norm"])


def test_adamw_fused_apply_falls_back_for_float_masks():
    layout_params = {"flat": torch.randn(10)}
    opt = optim.adamw(1e-2, weight_decay=0.1, mask={"flat": torch.tensor([1.0] * 5 + [0.0] * 5)})
    grads = {"flat": torch.randn(10)}
    fused, _ = opt.apply(grads, opt.init(layout_params), layout_params, None)
    updates, _ = opt.update(grads, opt.init(layout_params), layout_params)
    assert torch.equal(fused["flat"], optim.apply_updates(layout_params, updates)["flat"])
