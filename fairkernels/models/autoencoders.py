"""Autoencoders of the FCMI paper: fully connected (in-1024-1024-512-256-d) and convolutional
(28x28 images), both with an optional multi-branch decoder (a shared trunk plus one output
branch per protected group, routed by fairkernels.models.grouped).

Every model exposes encode(x) -> h [N, d], decode(h, groups) -> x_hat [N, D] and
forward(x, groups) -> (h, x_hat); inputs are flat [N, D] rows whatever the architecture.
"""
from __future__ import annotations

import torch
from torch import nn

from fairkernels.models.grouped import GroupConvTranspose2d, GroupLinear

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


class FCAutoencoder(nn.Module):
    """FCMI's fully connected autoencoder.

    Encoder: input - 1024 - 1024 - 512 (Linear+BatchNorm+ReLU) then 512 - 256 - d (the 256
    layer with BN+ReLU, the last one linear). The decoder mirrors it; with multi_branch=True
    (and num_groups > 1) its output layer is one Linear per group (FCMI's multi-branch decoder).
    `width` scales the hidden sizes (1.0 = the paper's)."""

    def __init__(self, input_dim: int, latent_dim: int, num_groups: int = 1, *, width: float = 1.0,
                 hidden=FCMI_HIDDEN, multi_branch: bool = True, batch_norm: bool = True):
        super().__init__()
        _check_dims(input_dim, latent_dim, num_groups)
        widths = scaled_widths(hidden, width)
        self.input_dim, self.latent_dim, self.num_groups = input_dim, latent_dim, num_groups
        self.encoder = nn.Sequential(_dense_block([input_dim] + widths, batch_norm), nn.Linear(widths[-1], latent_dim))
        self.decoder_trunk = _dense_block([latent_dim] + widths[::-1], batch_norm)
        self.multi_branch = multi_branch and num_groups > 1
        if self.multi_branch:
            self.decoder_out = GroupLinear(widths[0], input_dim, num_groups)
        else:
            self.decoder_out = nn.Linear(widths[0], input_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, h: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        trunk = self.decoder_trunk(h)
        if self.multi_branch:
            if groups is None:
                raise ValueError("groups is required by the multi-branch decoder")
            return self.decoder_out(trunk, groups)
        return self.decoder_out(trunk)

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
