"""Peng's SFCN in PyTorch, written from its definition (UKBiobank_deep_pretrain `dp_model/model_files/sfcn.py`),
used as the reference for parity tests and the benchmark. Module names match Peng's state_dict keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PengSFCN(nn.Module):
    def __init__(self, channel_number=(32, 64, 128, 256, 256, 64), output_dim=40, dropout=True):
        super().__init__()
        n = len(channel_number)
        self.feature_extractor = nn.Sequential()
        for i in range(n):
            in_ch = 1 if i == 0 else channel_number[i - 1]
            out_ch = channel_number[i]
            if i < n - 1:
                layer = nn.Sequential(nn.Conv3d(in_ch, out_ch, 3, padding=1), nn.BatchNorm3d(out_ch),
                                      nn.MaxPool3d(2, stride=2), nn.ReLU())
            else:
                layer = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, padding=0), nn.BatchNorm3d(out_ch), nn.ReLU())
            self.feature_extractor.add_module(f"conv_{i}", layer)
        self.classifier = nn.Sequential()
        self.classifier.add_module("average_pool", nn.AdaptiveAvgPool3d(1))  # = AvgPool3d([5,6,5]) at 160x192x160
        if dropout:
            self.classifier.add_module("dropout", nn.Dropout(0.5))
        self.classifier.add_module("conv_6", nn.Conv3d(channel_number[-1], output_dim, 1, padding=0))

    def features(self, x):
        return self.classifier.average_pool(self.feature_extractor(x)).flatten(1)

    def forward(self, x):
        x = self.classifier(self.feature_extractor(x))
        return F.log_softmax(x.flatten(1), dim=1)


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
