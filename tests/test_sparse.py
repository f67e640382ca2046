"""zoo.sparse: sparse tensors, the spconv-named layers against dense torch layers with the same
weights, kernel-map sharing, voxelisation, bad input, and torch.compile / torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo.kernels as K
from zoo.kernels.ops.sparse_kernel_map import random_coords
from zoo.sparse import (
    SparseConv3d,
    SparseInverseConv3d,
    SparseMaxPool3d,
    SparseSequential,
    SparseTensor,
    SubMConv3d,
    devoxelize,
    global_avg_pool,
    global_max_pool,
    voxelize,
)

SHAPE = (9, 10, 11)


def integer_tensor(c: int = 3, n: int = 120, seed: int = 0) -> SparseTensor:
    coords = random_coords(n, SHAPE, batch=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    features = torch.randint(-3, 4, (len(coords), c), generator=g).float()
    return SparseTensor(features, coords, SHAPE, 2)


def at_sites(dense: torch.Tensor, x: SparseTensor) -> torch.Tensor:
    i = x.indices.long()
    return dense[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]]


def integer_weights(layer: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())
    return layer


@pytest.mark.parametrize(
    "layer,dense",
    [
        (SubMConv3d(3, 5, 3), lambda x, w, b: F.conv3d(x, w, b, padding=1)),
        (SubMConv3d(3, 4, 3, dilation=2), lambda x, w, b: F.conv3d(x, w, b, padding=2, dilation=2)),
        (SparseConv3d(3, 5, 3, stride=2, padding=1), lambda x, w, b: F.conv3d(x, w, b, 2, 1)),
        (SparseConv3d(3, 2, 2, stride=2), lambda x, w, b: F.conv3d(x, w, b, 2)),
    ],
    ids=["subm3", "subm3-dilated", "conv3-s2", "conv2-s2"],
)
def test_layers_equal_dense_conv_with_the_same_weights(layer, dense):
    """Integer-valued features and weights: exact, forward and both gradients, at the output
    sites (a dense Conv3d's weights load as they are)."""
    x = integer_tensor()
    integer_weights(layer)
    feats = x.features.clone().requires_grad_()
    out = layer(x.replace_feature(feats))
    grad = torch.randint(-2, 3, out.features.shape, generator=torch.Generator().manual_seed(2))
    out.features.backward(grad.float())

    xd = x.dense().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    yd = dense(xd, w, layer.bias.detach())
    assert yd.shape[2:] == torch.Size(out.spatial_shape)
    assert torch.equal(at_sites(yd, out), out.features)
    gd = torch.zeros_like(yd)
    i = out.indices.long()
    gd[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]] = grad.float()
    if not layer.subm:  # every dense output that sees an input is one of ours
        occupied = SparseTensor(torch.ones(len(x.indices), 1), x.indices, SHAPE, 2).dense()
        ones = torch.ones(1, 1, *layer.kernel_size)
        assert int((dense(occupied, ones, None) > 0).sum()) == len(out.indices)
    yd.backward(gd)
    assert torch.equal(at_sites(xd.grad, x), feats.grad)
    assert torch.equal(w.grad, layer.weight.grad)


def test_inverse_conv_equals_conv_transpose_with_its_weights():
    x = integer_tensor(seed=3)
    down = integer_weights(SparseConv3d(3, 4, 2, stride=2, bias=False, indice_key="d"))
    up = integer_weights(SparseInverseConv3d(4, 2, 2, indice_key="d"), seed=5)
    dense_up = nn.ConvTranspose3d(4, 2, 2, stride=2)
    dense_up.load_state_dict(up.state_dict())  # nn.ConvTranspose3d's layout
    h = down(x)
    y = up(h)
    assert torch.equal(y.indices, x.indices) and y.spatial_shape == x.spatial_shape
    # inputs on an odd grid's last plane reach no output of the stride-2 conv: zero there
    yd = dense_up(h.dense(), output_size=list(SHAPE))
    assert torch.equal(at_sites(yd, y), y.features)


def test_max_pool_equals_dense_max_pool_on_positive_features():
    x = integer_tensor(seed=4)
    x = x.replace_feature(x.features.abs() + 1)
    for pool, dense in (
        (SparseMaxPool3d(3, 2, 1), lambda d: F.max_pool3d(d, 3, 2, 1)),
        (SparseMaxPool3d(2), lambda d: F.max_pool3d(d, 2)),
        (SparseMaxPool3d(3, subm=True), lambda d: F.max_pool3d(d, 3, 1, 1)),
    ):
        y = pool(x)
        assert torch.equal(at_sites(dense(x.dense()), y), y.features)


def test_kernel_maps_are_built_once_and_shared():
    x = integer_tensor(c=4)
    net = SparseSequential(
        SubMConv3d(4, 8, 3),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        SubMConv3d(8, 8, 3),
        SparseConv3d(8, 8, 2, stride=2, indice_key="d1"),
        SubMConv3d(8, 8, 3),
        SubMConv3d(8, 8, 3),
        SparseInverseConv3d(8, 4, 2, indice_key="d1"),
        SubMConv3d(4, 4, 3),
    )
    y = net(x)
    # subm at stride 1 (shared by 3 layers), the strided conv, subm at stride 2 (2 layers),
    # the inverse of the strided map
    assert x.maps.built == 4
    assert torch.equal(y.indices, x.indices) and y.features.shape == (len(x.indices), 4)
    y.features.sum().backward()


def test_dense_round_trip_and_global_pooling():
    x = integer_tensor(c=2, seed=6)
    back = SparseTensor.from_dense(x.dense())
    assert back.dense().equal(x.dense())
    assert x.dense(channels_first=False).shape == (2, *SHAPE, 2)
    b = x.indices[:, 0].long()
    for pool, ref in ((global_avg_pool, torch.mean), (global_max_pool, torch.amax)):
        out = pool(x)
        assert out.shape == (2, 2)
        for s in range(2):
            torch.testing.assert_close(out[s], ref(x.features[b == s], 0))


def test_voxelize_means_the_points_of_each_voxel_and_maps_them_back():
    points = torch.tensor(
        [[0.1, 0.1, 0.1, 1.0], [0.4, 0.2, 0.3, 3.0], [1.2, 0.1, 0.1, 5.0], [9.0, 0.0, 0.0, 0.0]]
    )
    v = voxelize(points, 0.5, (0, 0, 0, 2, 2, 2))
    assert v.point_voxel.tolist() == [0, 0, 1, -1]  # the last point is out of range
    assert v.tensor.indices.tolist() == [[0, 0, 0, 0], [0, 0, 0, 2]]  # (batch, z, y, x)
    torch.testing.assert_close(v.tensor.features[0], points[:2].mean(0))
    assert v.tensor.spatial_shape == [4, 4, 4]
    values = torch.tensor([[7.0], [8.0]])
    assert devoxelize(values, v.point_voxel, fill=-1).flatten().tolist() == [7, 7, 8, -1]
    again = voxelize(points, 0.5, (0, 0, 0, 2, 2, 2))
    assert torch.equal(again.tensor.features, v.tensor.features)


def test_bad_input_gets_a_clear_error():
    coords = torch.tensor([[0, 1, 2, 3], [0, 9, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"row 1 .*\[0, 9, 0, 0\].*outside the spatial shape"):
        SparseTensor(torch.zeros(2, 1), coords, SHAPE, 1)
    dup = torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4], [0, 1, 2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"row 2 .*\[0, 1, 2, 3\].*duplicates='mean'"):
        SparseTensor(torch.zeros(3, 1), dup, SHAPE, 1)
    merged = SparseTensor(torch.tensor([[1.0], [5.0], [3.0]]), dup, SHAPE, 1, duplicates="mean")
    assert merged.indices.tolist() == [[0, 1, 2, 3], [0, 4, 4, 4]]
    assert merged.features.flatten().tolist() == [2.0, 5.0]
    with pytest.raises(ValueError, match=r"odd kernel_size.*\[2, 2, 2\]"):
        SubMConv3d(1, 1, 2)
    with pytest.raises(ValueError, match="batch 1, but batch_size=1"):
        SparseTensor(torch.zeros(1, 1), torch.tensor([[1, 0, 0, 0]], dtype=torch.int32), SHAPE, 1)
    x = integer_tensor(c=3)
    with pytest.raises(ValueError, match="3 channels, the layer takes 4"):
        SubMConv3d(4, 4, 3)(x)
    with pytest.raises(ValueError, match="no convolution with that indice_key"):
        SparseInverseConv3d(3, 3, 2, indice_key="nowhere")(x)


def test_layers_are_deterministic():
    x = integer_tensor(c=4, seed=8)
    x = x.replace_feature(torch.randn(x.features.shape, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    net = SparseSequential(
        SubMConv3d(4, 16, 3),
        SparseConv3d(16, 16, 3, 2, 1),
        SparseMaxPool3d(2),
        SubMConv3d(16, 8, 3),
    )
    runs = []
    for _ in range(2):
        feats = x.features.clone().requires_grad_()
        y = net(SparseTensor(feats, x.indices, SHAPE, 2))
        y.features.pow(2).sum().backward()
        runs.append((y.features.detach(), feats.grad, [p.grad.clone() for p in net.parameters()]))
        net.zero_grad()
    (a, ga, pa), (b, gb, pb) = runs
    assert torch.equal(a, b) and torch.equal(ga, gb) and all(map(torch.equal, pa, pb))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = SparseSequential(
            SubMConv3d(3, 8, 3), nn.ReLU(), SparseConv3d(8, 8, 2, stride=2), SubMConv3d(8, 4, 3)
        )

    def forward(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.net(SparseTensor(features, indices, SHAPE, 2, _checked=True)).features


def test_torch_compile_and_export_trace_the_data_dependent_sizes():
    torch.manual_seed(0)
    model = _Net().eval()
    x = integer_tensor()
    eager = model(x.features, x.indices)
    compiled = torch.compile(model, dynamic=True)(x.features, x.indices)
    torch.testing.assert_close(compiled, eager)
    exported = torch.export.export(model, (x.features, x.indices))
    torch.testing.assert_close(exported.module()(x.features, x.indices), eager)
    ops = {
        n.target.name()
        for n in exported.graph.nodes
        if n.op == "call_function" and hasattr(n.target, "name")
    }
    assert {"zoo::sparse_kernel_map", "zoo::sparse_conv"} <= ops or K.backend() == "reference"


SPCONV_LAYERS = {
    # name: (ours, spconv's, the dense op both compute at their output sites)
    "subm3": (
        lambda: SubMConv3d(8, 16, 3, bias=False),
        "SubMConv3d(8, 16, 3, bias=False)",
        lambda x, w: F.conv3d(x, w, padding=1),
    ),
    "conv3-s2": (
        lambda: SparseConv3d(8, 16, 3, 2, 1, bias=False),
        "SparseConv3d(8, 16, 3, 2, 1, bias=False)",
        lambda x, w: F.conv3d(x, w, stride=2, padding=1),
    ),
    "conv2-s2": (
        lambda: SparseConv3d(8, 16, 2, 2, bias=False),
        "SparseConv3d(8, 16, 2, 2, bias=False)",
        lambda x, w: F.conv3d(x, w, stride=2),
    ),
    "maxpool3-s2": (
        lambda: SparseMaxPool3d(3, 2, 1),
        "SparseMaxPool3d(3, 2, 1)",
        lambda x, w: F.max_pool3d(x, 3, 2, 1),
    ),
}


@pytest.mark.parametrize("name", list(SPCONV_LAYERS))
def test_matches_spconv_on_random_float_data(name):
    """spconv 2.3.8's CPU build (the dev extra) on random float data with the same weights
    (spconv keeps them as [out, kz, ky, kx, in]): the same output sites, and outputs within
    1e-5 of spconv's.

    Except where spconv is wrong: its CPU convolutions get a few output rows wrong (different
    rows from call to call; with a bias, more), so every row of ours is checked against the
    dense op, and ours equals spconv's at every row where spconv equals the dense op too (which
    must be at least 99% of them). Max-pooling compares positive features: spconv starts its
    max at 0, so a negative max comes out 0 (ours is F.max_pool3d's)."""
    sp = pytest.importorskip("spconv.pytorch", reason="spconv is in the dev extra")
    make, theirs_name, dense_op = SPCONV_LAYERS[name]
    g = torch.Generator().manual_seed(11)
    shape = [21, 40, 40]
    coords = random_coords(1500, shape, batch=2, seed=12)
    features = torch.randn(len(coords), 8, generator=g)
    if "maxpool" in name:
        features = features.abs() + 0.1
    layer = make()
    theirs_layer = eval("sp." + theirs_name)
    weight = getattr(layer, "weight", None)
    if weight is not None:
        with torch.no_grad():
            theirs_layer.weight.copy_(weight.permute(0, 2, 3, 4, 1))
    x = SparseTensor(features, coords, shape, 2)
    with torch.no_grad():
        a = layer(x)
        b = theirs_layer(sp.SparseConvTensor(features, coords, shape, 2))
        dense = dense_op(x.dense(), weight.detach() if weight is not None else None)
    assert list(b.spatial_shape) == a.spatial_shape
    ka = zs_keys(a.indices, a.spatial_shape)
    kb = zs_keys(b.indices.int(), a.spatial_shape)
    assert torch.equal(ka.sort().values, kb.sort().values)  # the same sites
    ours, spconv = a.features[ka.argsort()], b.features[kb.argsort()]
    truth = at_sites(dense, SparseTensor(ours, a.indices[ka.argsort()], a.spatial_shape, 2))
    torch.testing.assert_close(ours, truth, atol=1e-5, rtol=1e-5)
    right = ((spconv - truth).abs() <= 1e-5 + 1e-5 * truth.abs()).all(1)
    assert float(right.float().mean()) >= 0.99
    torch.testing.assert_close(ours[right], spconv[right], atol=1e-5, rtol=1e-5)


def zs_keys(indices: torch.Tensor, shape) -> torch.Tensor:
    from zoo.kernels.reference import coordinate_keys

    return coordinate_keys(indices, shape)
