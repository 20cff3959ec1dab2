"""`pool_to` gives adaptive pooling's numbers bit for bit, forward and backward, on every path it takes."""

import pytest
import torch
import torch.nn.functional as F

from benchmark.models.pooling import AvgPoolTo, pool_to

ADAPTIVE = {("max", 1): F.adaptive_max_pool1d, ("max", 2): F.adaptive_max_pool2d,
            ("avg", 1): F.adaptive_avg_pool1d, ("avg", 2): F.adaptive_avg_pool2d}

CASES = [  # (map shape, output size): identity, plain windows (divisible sides), adaptive windows (the rest)
    ((128, 16, 4, 4), (4, 4)), ((64, 32, 2, 4), (2, 4)), ((8, 3, 1, 1), (1, 1)),
    ((128, 16, 4, 8), (4, 4)), ((16, 8, 8, 8), (4, 4)), ((16, 8, 14, 14), (7, 7)), ((16, 8, 6, 9), (2, 3)),
    ((16, 8, 12, 12), (1, 1)), ((16, 8, 16), (4,)), ((16, 8, 50), (8,)), ((16, 8, 8), (8,)),
    ((16, 8, 18), (2,)), ((16, 8, 12, 12), (3, 3)),
    ((16, 8, 14, 14), (4, 4)), ((16, 8, 7, 7), (4, 4)), ((16, 8, 25), (8,)),
]


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape,size", CASES)
def test_pool_to_equals_adaptive_pooling_bitwise(shape, size, kind):
    torch.manual_seed(0)
    # ReLU'd maps with many exact zeros and repeated values: ties are where a max pooling could route gradients
    # to another element than the adaptive kernel does
    x = torch.relu(torch.randn(shape)).mul(4).round().div(4) + torch.rand(shape).lt(0.1) * torch.randn(shape)
    x.requires_grad_(True)
    expected = ADAPTIVE[kind, len(size)](x, size)
    got = pool_to(x, size, kind)
    assert got.shape == expected.shape and torch.equal(got, expected)
    upstream = torch.randn(expected.shape)
    expected_grad, = torch.autograd.grad(expected, x, upstream)
    got_grad, = torch.autograd.grad(got, x, upstream)
    assert torch.equal(got_grad, expected_grad)


@pytest.mark.parametrize("shape,size,kind,plain", [
    ((4, 2, 4, 4), (4, 4), "avg", None), ((4, 2, 4, 8), (4, 4), "avg", "AvgPool2D"),
    ((4, 2, 6, 9), (2, 3), "max", "MaxPool2DWithIndices"), ((4, 2, 6, 9), (2, 3), "avg", "AdaptiveAvgPool2D"),
    ((4, 2, 12, 12), (3, 3), "avg", "AvgPool2D"), ((4, 2, 7, 7), (4, 4), "max", "AdaptiveMaxPool2D"),
])
def test_pool_to_takes_the_cheap_path_where_it_is_exact(shape, size, kind, plain):
    x = torch.randn(shape, requires_grad=True)
    got = pool_to(x, size, kind)
    if plain is None:
        assert got is x
    else:
        assert type(got.grad_fn).__name__.startswith(plain)


def test_avg_pool_module_takes_an_int_or_a_size():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(AvgPoolTo(2, dims=2)(x), F.adaptive_avg_pool2d(x, 2))
    assert torch.equal(AvgPoolTo((4, 2), dims=2)(x), F.adaptive_avg_pool2d(x, (4, 2)))
    assert torch.equal(AvgPoolTo(4, dims=1)(x[:, :, 0]), F.adaptive_avg_pool1d(x[:, :, 0], 4))
