"""Autoencoders of the FCMI paper: fully connected (in-1024-1024-512-256-d) and convolutional
(28x28 images), both with an optional multi-branch decoder (a shared trunk plus one output
branch per protected group, routed by fairkernels.models.grouped).

Every model exposes encode(x) -> h [N, d], decode(h, groups) -> x_hat [N, D] and
forward(x, groups) -> (h, x_hat); inputs are flat [N, D] rows whatever the architecture.
"""
from __future__ import annotations

import torch
from torch import nn

from fairkernels.models.grouped import GroupBatchNorm1d, GroupConvTranspose2d, GroupLinear, group_order

FCMI_HIDDEN = (1024, 1024, 512, 256)


def scaled_widths(widths, width: float) -> list[int]:
    """Hidden sizes multiplied by `width` (small demos use width < 1), at least 8 units each."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return [max(8, int(round(w * width))) for w in widths]


def _check_dims(input_dim: int, latent_dim: int, num_groups: int) -> None:
    for name, value in (("input_dim", input_dim), ("latent_dim", latent_dim), ("num_groups", num_groups)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _dense_block(sizes, batch_norm: bool) -> nn.Sequential:
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers.append(nn.Linear(fan_in, fan_out))
        if batch_norm:
            layers.append(nn.BatchNorm1d(fan_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class GroupMLP(nn.Module):
    """Linear (+ BatchNorm) + ReLU layers whose weights and batch statistics belong to the row's
    group (one MLP per group, routed without a Python loop for a few groups; see grouped.py),
    then a last GroupLinear without activation. With num_groups = 1 it is a plain MLP."""

    def __init__(self, sizes, num_groups: int, batch_norm: bool):
        super().__init__()
        self.linears = nn.ModuleList(GroupLinear(a, b, num_groups) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList(GroupBatchNorm1d(b, num_groups) for b in sizes[1:-1]) if batch_norm else None

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        last = len(self.linears) - 1
        # Every layer routes by the same groups: sort them once (one host read), not per layer.
        rows_by_group = group_order(groups, self.linears[0].num_groups) \
            if self.linears[0].uses_sorted_rows(x) else None
        for index, linear in enumerate(self.linears):
            x = linear(x, groups, rows_by_group)
            if index < last:
                if self.norms is not None:
                    x = self.norms[index](x, groups)
                x = torch.relu(x)
        return x


class FCAutoencoder(nn.Module):
    """FCMI's fully connected autoencoder, laid out as the authors' network for vector data.

    Encoder: input - 1024 - 1024 - 512 (Linear+BatchNorm+ReLU), then 512 - 256 (Linear+ReLU)
    and 256 - d (linear). Decoder: the L2-normalised code (normalize_latent) through a shared
    d - 256 - 512 (Linear+ReLU), then 512 - 1024 - 1024 - input with BatchNorm, which with
    multi_branch=True (and num_groups > 1) is a separate branch per protected group, its own
    weights and batch statistics (the paper's group-wise decoder). Reconstructing from the
    unit-norm code means the decoder sees exactly what the cosine clustering sees, and the deep
    per-group branch can render each group's appearance from a code that need not carry the
    group. `width` scales the hidden sizes (1.0 = the paper's); batch_norm=False drops every
    BatchNorm. decoder_branch_layers: how many of the decoder's last Linear layers are per group
    (3 = the paper's; 1 = only the output layer)."""

    def __init__(self, input_dim: int, latent_dim: int, num_groups: int = 1, *, width: float = 1.0,
                 hidden=FCMI_HIDDEN, multi_branch: bool = True, batch_norm: bool = True,
                 normalize_latent: bool = True, decoder_branch_layers: int = 3):
        super().__init__()
        _check_dims(input_dim, latent_dim, num_groups)
        widths = scaled_widths(hidden, width)
        if not isinstance(decoder_branch_layers, int) or not 1 <= decoder_branch_layers <= len(widths):
            raise ValueError(f"decoder_branch_layers must be an int in [1, {len(widths)}], "
                             f"got {decoder_branch_layers!r}")
        self.input_dim, self.latent_dim, self.num_groups = input_dim, latent_dim, num_groups
        self.normalize_latent = normalize_latent
        # BatchNorm on the wide layers only, as the authors' "1001" layout: not on the layers
        # next to the code, where it would re-scale the code the clustering works on.
        bn_encoder = len(widths) - 1
        self.encoder = nn.Sequential(_dense_block([input_dim] + widths[:bn_encoder], batch_norm),
                                     _dense_block(widths[bn_encoder - 1:], False), nn.Linear(widths[-1], latent_dim))
        decoder_sizes = [latent_dim] + widths[::-1] + [input_dim]
        split = len(decoder_sizes) - 1 - decoder_branch_layers      # index of the first branch input
        self.decoder_trunk = _dense_block(decoder_sizes[:split + 1], False)
        self.multi_branch = multi_branch and num_groups > 1
        self.decoder_branch = GroupMLP(decoder_sizes[split:], num_groups if self.multi_branch else 1, batch_norm)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, h: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        if self.normalize_latent:
            h = nn.functional.normalize(h, dim=1)
        trunk = self.decoder_trunk(h)
        if self.multi_branch:
            if groups is None:
                raise ValueError("groups is required by the multi-branch decoder")
        else:
            groups = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        return self.decoder_branch(trunk, groups)

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None):
        h = self.encode(x)
        return h, self.decode(h, groups)


class ConvAutoencoder(nn.Module):
    """FCMI's convolutional autoencoder for 28x28 images (flat rows of channels*784 values).

    Encoder: 4 conv layers with 16-32-32-16 channels, 3x3 kernels, strides 1-2-1-2 (28 -> 7),
    BN+ReLU, then 784 - 256 - d. Decoder: d - 256 - 784, then transposed convolutions mirroring
    the encoder, tanh output. With multi_branch=True the last transposed conv is per group."""

    CHANNELS = (16, 32, 32, 16)
    STRIDES = (1, 2, 1, 2)

    def __init__(self, latent_dim: int, num_groups: int = 1, *, in_channels: int = 1, image_size: int = 28,
                 width: float = 1.0, multi_branch: bool = True):
        super().__init__()
        _check_dims(in_channels * image_size * image_size, latent_dim, num_groups)
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        channels = scaled_widths(self.CHANNELS, width)
        self.in_channels, self.image_size = in_channels, image_size
        self.input_dim = in_channels * image_size * image_size
        self.latent_dim, self.num_groups = latent_dim, num_groups
        convs, fan_in = [], in_channels
        for fan_out, stride in zip(channels, self.STRIDES):
            convs += [nn.Conv2d(fan_in, fan_out, 3, stride=stride, padding=1), nn.BatchNorm2d(fan_out),
                      nn.ReLU(inplace=True)]
            fan_in = fan_out
        self.conv_encoder = nn.Sequential(*convs)
        self.code_shape = (channels[-1], image_size // 4, image_size // 4)
        flat = channels[-1] * (image_size // 4) ** 2
        hidden = scaled_widths((256,), width)[0]
        self.fc_encoder = nn.Sequential(nn.Linear(flat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, latent_dim))
        self.fc_decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, flat), nn.BatchNorm1d(flat), nn.ReLU(inplace=True))
        # Mirror: channels 16 -> 32 -> 32 -> 16 -> in_channels with strides 2-1-2-1.
        rev_channels = channels[::-1]
        rev_strides = self.STRIDES[::-1]
        deconvs = []
        for fan_in, fan_out, stride in zip(rev_channels[:-1], rev_channels[1:], rev_strides[:-1]):
            deconvs += [nn.ConvTranspose2d(fan_in, fan_out, 3, stride=stride, padding=1, output_padding=stride - 1),
                        nn.BatchNorm2d(fan_out), nn.ReLU(inplace=True)]
        self.deconv_trunk = nn.Sequential(*deconvs)
        self.multi_branch = multi_branch and num_groups > 1
        last_stride = rev_strides[-1]
        if self.multi_branch:
            self.deconv_out = GroupConvTranspose2d(rev_channels[-1], in_channels, num_groups, 3, stride=last_stride,
                                                   padding=1, output_padding=last_stride - 1)
        else:
            self.deconv_out = nn.ConvTranspose2d(rev_channels[-1], in_channels, 3, stride=last_stride, padding=1,
                                                 output_padding=last_stride - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x must have shape [N, {self.input_dim}], got {tuple(x.shape)}")
        images = x.view(-1, self.in_channels, self.image_size, self.image_size)
        return self.fc_encoder(self.conv_encoder(images).flatten(1))

    def decode(self, h: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        trunk = self.deconv_trunk(self.fc_decoder(h).view(-1, *self.code_shape))
        if self.multi_branch:
            if groups is None:
                raise ValueError("groups is required by the multi-branch decoder")
            out = self.deconv_out(trunk, groups)
        else:
            out = self.deconv_out(trunk)
        return torch.tanh(out).flatten(1)

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None):
        h = self.encode(x)
        return h, self.decode(h, groups)
