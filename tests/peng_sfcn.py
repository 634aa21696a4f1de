"""Test helpers around Peng's SFCN in PyTorch; the model itself is `jaxtl.torch_sfcn.PengSFCN` (shared with
`jaxtl bench`)."""

from __future__ import annotations

import torch
from torch import nn

from jaxtl.torch_sfcn import PengSFCN

__all__ = ["PengSFCN", "calibrated_model", "save_dataparallel"]


def calibrated_model(channels, output_dim, x: torch.Tensor, seed: int = 0) -> PengSFCN:
    """A PyTorch SFCN with random weights and non-trivial BatchNorm statistics that keep activations O(1) on `x`.

    Running statistics are set from one train-mode pass over `x` (momentum 1), then perturbed, and the BN
    affine parameters randomised, so eval-mode outputs depend on every tensor the converter maps.
    """
    torch.manual_seed(seed)
    model = PengSFCN(channels, output_dim)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    for bn in bns:
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        model.feature_extractor(x)
        g = torch.Generator().manual_seed(seed + 1)
        for bn in bns:
            c = bn.num_features
            bn.momentum = 0.1
            bn.running_mean += 0.1 * bn.running_var.sqrt() * torch.randn(c, generator=g)
            bn.running_var *= 0.8 + 0.4 * torch.rand(c, generator=g)
            bn.weight.copy_(0.5 + torch.rand(c, generator=g))
            bn.bias.copy_(0.2 * torch.randn(c, generator=g))
        head = model.classifier.conv_6
        head.weight.mul_(3.0)  # spread the log-probabilities so the comparison is not trivially flat
    model.eval()
    return model


def save_dataparallel(model: nn.Module, path, legacy: bool = False) -> None:
    """Save as Peng did: the state_dict of `nn.DataParallel(model)` (keys prefixed `module.`)."""
    sd = nn.DataParallel(model).state_dict()
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
