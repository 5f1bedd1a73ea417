import optree
import pytest
import torch

from fnllama import tree


def _tree():
    return {"b": [torch.arange(6.0).view(2, 3), torch.ones(4, dtype=torch.bfloat16)],
            "a": {"w": torch.full((5,), 2.0)}}


def test_paths_sizes_bytes():
    t = _tree()
    paths = [p for p, _ in tree.paths_and_leaves(t)]
    assert paths == ["a.w", "b.0", "b.1"]
    assert tree.num_elements(t) == 15
    assert tree.num_bytes(t) == 5 * 4 + 6 * 4 + 4 * 2


@pytest.mark.parametrize("pad_to", [1, 2, 4, 7])
def test_flatten_roundtrip_with_padding(pad_to):
    t = _tree()
    layout = tree.make_layout(t, pad_to=pad_to)
    assert layout.total == 15 and layout.padded_total % pad_to == 0
    assert layout.padded_total - layout.total < pad_to
    flat = tree.flatten(t, layout, dtype=torch.float32)
    assert flat.shape == (layout.padded_total,)
    assert torch.all(flat[layout.total:] == 0)
    back = tree.unflatten(flat, layout)
    for (p, x), (_, y) in zip(tree.paths_and_leaves(t), tree.paths_and_leaves(back)):
        assert torch.equal(x.float(), y), p
    # leaves are views: writing the buffer shows through
    flat[0] = 99.0
    assert back["a"]["w"][0] == 99.0


def test_layout_on_meta_allocates_nothing():
    t = optree.tree_map(lambda x: torch.empty(x.shape, device="meta"), _tree())
    layout = tree.make_layout(t, pad_to=8)
    assert layout.shapes == ((5,), (2, 3), (4,))
    assert layout.offsets == (0, 5, 11)


def test_unflatten_rejects_short_buffer():
    layout = tree.make_layout(_tree())
    with pytest.raises(ValueError, match="15"):
        tree.unflatten(torch.zeros(3), layout)
