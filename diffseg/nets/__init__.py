"""Networks: time-conditioned UNet, SegDiff's RRDB image encoder and denoiser, SDN neck (docs/methods.md §1-§4)."""

from diffseg.nets.rrdb import RRDB, DenseBlock, RRDBEncoder
from diffseg.nets.sdn import SDNFusion, SDNNeck, SemanticDifferenceConv
from diffseg.nets.segdiff_denoiser import SegDiffDenoiser
from diffseg.nets.unet import AttentionBlock, ResBlock, TimeUNet, sinusoidal_embedding

__all__ = [
    "AttentionBlock",
    "DenseBlock",
    "RRDB",
    "RRDBEncoder",
    "ResBlock",
    "SDNFusion",
    "SDNNeck",
    "SegDiffDenoiser",
    "SemanticDifferenceConv",
    "TimeUNet",
    "sinusoidal_embedding",
]
