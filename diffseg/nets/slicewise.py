"""Run a 2D network on 3D data one slice at a time (the "2D slice model" ablation of ImgX).

The data layer serves patches of shape (H, W, 1); this wrapper drops the singleton last axis for
the 2D network and restores it, so training, sliding-window evaluation and metrics stay 3D.
"""
from __future__ import annotations

import torch
from torch import nn


class SliceWise(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.ndim != 5 or x.shape[-1] != 1:
            raise ValueError(f"SliceWise expects (B, C, H, W, 1) patches (data.patch_size=[H, W, 1]), got {tuple(x.shape)}")
        args = [a.squeeze(-1) if isinstance(a, torch.Tensor) and a.ndim == 5 else a for a in args]
        kwargs = {k: v.squeeze(-1) if isinstance(v, torch.Tensor) and v.ndim == 5 else v for k, v in kwargs.items()}
        return self.net(x.squeeze(-1), *args, **kwargs).unsqueeze(-1)

    def conv_in_fixed(self, fixed: torch.Tensor) -> torch.Tensor:
        """The 2D network's ``conv_in_fixed`` on (B, C, H, W, 1) patches."""
        return self.net.conv_in_fixed(fixed.squeeze(-1)).unsqueeze(-1)
