"""DFC's / DEC's stacked denoising autoencoder D-500-500-2000-d (decoder mirrored).

Layer-wise pretraining (fairkernels.train.pretrain) trains pair i = (encoder layer i, decoder
layer i) as a one-hidden-layer denoising autoencoder on the codes of layers < i, then the whole
stack is fine-tuned end to end. ReLU everywhere except the embedding and the reconstruction
(linear), as in DEC."""
from __future__ import annotations

import torch
from torch import nn

from fairkernels.models.autoencoders import _check_dims, scaled_widths

SDAE_HIDDEN = (500, 500, 2000)


class StackedAutoencoder(nn.Module):
    def __init__(self, input_dim: int, latent_dim: int, *, width: float = 1.0, hidden=SDAE_HIDDEN,
                 dropout: float = 0.2):
        super().__init__()
        _check_dims(input_dim, latent_dim, 1)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        sizes = [input_dim] + scaled_widths(hidden, width) + [latent_dim]
        self.input_dim, self.latent_dim, self.dropout = input_dim, latent_dim, dropout
        self.num_groups, self.multi_branch = 1, False
        self.encoder_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        # decoder_layers[i] inverts encoder_layers[i]; decoding runs them in reverse order.
        self.decoder_layers = nn.ModuleList(nn.Linear(b, a) for a, b in zip(sizes[:-1], sizes[1:]))

    @property
    def depth(self) -> int:
        return len(self.encoder_layers)

    def encode_layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder_layers[i](x)
        return out if i == self.depth - 1 else torch.relu(out)

    def decode_layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out = self.decoder_layers[i](h)
        return out if i == 0 else torch.relu(out)

    def encode(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Codes after encoder layers [0, upto) (all of them by default)."""
        for i in range(self.depth if upto is None else upto):
            x = self.encode_layer(i, x)
        return x

    def decode(self, h: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        for i in reversed(range(self.depth)):
            h = self.decode_layer(i, h)
        return h

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None):
        h = self.encode(x)
        return h, self.decode(h)
