"""Model shapes, gradients, and the multi-branch routing (equal to a per-group loop)."""
import pytest
import torch

from fairkernels.models import (ConvAutoencoder, FCAutoencoder, GroupBatchNorm1d, GroupConvTranspose2d,
                                GroupLinear, StackedAutoencoder)
from fairkernels.models.grouped import DENSE_MAX_GROUPS


def _groups(n, t, seed=0):
    return torch.randint(0, t, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("routing", ["auto", "dense", "sorted"])
@pytest.mark.parametrize("num_groups", [1, 3, DENSE_MAX_GROUPS + 3])
def test_group_linear_matches_per_group_loop(num_groups, routing):
    torch.manual_seed(0)
    layer = GroupLinear(7, 5, num_groups, routing=routing).double()
    x = torch.randn(13, 7, dtype=torch.float64, requires_grad=True)
    g = _groups(13, num_groups)
    out = layer(x, g)
    expected = torch.stack([x[i] @ layer.weight[g[i]] + layer.bias[g[i]] for i in range(13)])
    torch.testing.assert_close(out, expected)
    # Gradients as well: each branch only receives its own rows' gradient.
    out.square().sum().backward()
    grad_w = layer.weight.grad.clone()
    layer.zero_grad()
    x.grad = None
    expected.square().sum().backward()
    torch.testing.assert_close(grad_w, layer.weight.grad)


def test_group_batch_norm_matches_per_group_batch_norm():
    torch.manual_seed(0)
    norm = GroupBatchNorm1d(4, 3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(20, 4, dtype=torch.float64) * 3 + 1
    g = torch.tensor([0] * 9 + [2] * 11)            # group 1 is absent from the batch
    out = norm(x, g)
    for t in (0, 2):
        rows = g == t
        expected = torch.nn.functional.batch_norm(x[rows], None, None, norm.weight[t], norm.bias[t], training=True,
                                                  eps=norm.eps)
        torch.testing.assert_close(out[rows], expected)
    # Running statistics move for the groups present only (momentum 0.1, unbiased variance).
    torch.testing.assert_close(norm.running_mean[0], 0.1 * x[:9].mean(0))
    torch.testing.assert_close(norm.running_var[2], 0.9 + 0.1 * x[9:].var(0))
    torch.testing.assert_close(norm.running_mean[1], torch.zeros(4, dtype=torch.float64))
    norm.eval()
    expected = (x - norm.running_mean[g]) / torch.sqrt(norm.running_var[g] + norm.eps) * norm.weight[g] + norm.bias[g]
    torch.testing.assert_close(norm(x, g), expected)
    norm.train()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: norm(inp, g), (x,))


def test_fc_autoencoder_layout_follows_the_paper():
    model = FCAutoencoder(64, 10, num_groups=2)
    # Encoder BatchNorm on the three wide layers only; the 512-256-d head and the shared
    # decoder trunk have none; the 512-1024-1024-64 decoder part is one branch per group.
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.encoder.modules()) == 3
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.decoder_trunk.modules())
    assert [layer.out_features for layer in model.decoder_branch.linears] == [1024, 1024, 64]
    assert all(layer.num_groups == 2 for layer in model.decoder_branch.linears)
    # The decoder sees the unit-norm code: scaling h does not change the reconstruction.
    model.eval()
    h, g = torch.randn(5, 10), torch.tensor([0, 1, 0, 1, 1])
    torch.testing.assert_close(model.decode(h, g), model.decode(7.0 * h, g))
    with pytest.raises(ValueError, match="decoder_branch_layers"):
        FCAutoencoder(64, 10, decoder_branch_layers=0)


def test_group_linear_rejects_bad_groups():
    layer = GroupLinear(4, 3, 2)
    with pytest.raises(ValueError, match="groups"):
        layer(torch.randn(5, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_groups"):
        GroupLinear(4, 3, 0)


def test_group_conv_transpose_matches_per_group_loop():
    torch.manual_seed(0)
    layer = GroupConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1).double()
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    g = torch.tensor([0, 2, 1, 2, 0, 1])
    out = layer(x, g)
    full = layer.conv(x).view(6, 3, 2, 10, 10)
    for i in range(6):
        torch.testing.assert_close(out[i], full[i, g[i]])
    assert out.shape == (6, 2, 10, 10)


@pytest.mark.parametrize("multi_branch", [False, True])
def test_fc_autoencoder_shapes_and_backward(multi_branch):
    torch.manual_seed(0)
    model = FCAutoencoder(20, 4, num_groups=2, width=0.05, multi_branch=multi_branch)
    x, g = torch.randn(9, 20), _groups(9, 2)
    h, x_hat = model(x, g)
    assert h.shape == (9, 4) and x_hat.shape == (9, 20)
    (x_hat - x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.multi_branch == multi_branch


def test_fc_autoencoder_paper_widths():
    model = FCAutoencoder(64, 10)
    linear_sizes = [m.out_features for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linear_sizes == [1024, 1024, 512, 256, 10]


def test_multi_branch_decoder_uses_group():
    torch.manual_seed(0)
    model = FCAutoencoder(6, 3, num_groups=2, width=0.02).eval()
    h = torch.randn(4, 3)
    a = model.decode(h, torch.zeros(4, dtype=torch.long))
    b = model.decode(h, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="groups"):
        model.decode(h)


def test_conv_autoencoder_shapes_and_backward():
    torch.manual_seed(0)
    model = ConvAutoencoder(5, num_groups=2, width=0.5)
    x, g = torch.rand(3, 784) * 2 - 1, _groups(3, 2)
    h, x_hat = model(x, g)
    assert h.shape == (3, 5) and x_hat.shape == (3, 784)
    assert x_hat.abs().max() <= 1.0
    x_hat.sum().backward()
    assert model.conv_encoder[0].weight.grad is not None
    with pytest.raises(ValueError, match="x must have shape"):
        model.encode(torch.randn(3, 100))


def test_stacked_autoencoder():
    model = StackedAutoencoder(12, 3, width=0.02)
    assert model.depth == 4
    x = torch.randn(5, 12)
    h, x_hat = model(x)
    assert h.shape == (5, 3) and x_hat.shape == (5, 12)
    torch.testing.assert_close(model.encode(x, upto=2), model.encode_layer(1, model.encode_layer(0, x)))
    with pytest.raises(ValueError, match="dropout"):
        StackedAutoencoder(12, 3, dropout=1.0)
