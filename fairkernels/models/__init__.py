"""Autoencoders of the FCMI (FC, conv, multi-branch decoder) and DFC/DEC (SDAE) papers."""
from fairkernels.models.autoencoders import ConvAutoencoder, FCAutoencoder, scaled_widths
from fairkernels.models.grouped import GroupBatchNorm1d, GroupConvTranspose2d, GroupLinear
from fairkernels.models.sdae import StackedAutoencoder

__all__ = ["ConvAutoencoder", "FCAutoencoder", "GroupBatchNorm1d", "GroupConvTranspose2d", "GroupLinear",
           "StackedAutoencoder", "scaled_widths"]
