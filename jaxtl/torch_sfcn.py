"""Peng's SFCN in PyTorch, written from its definition (UKBiobank_deep_pretrain `dp_model/model_files/sfcn.py`).

The reference for the parity tests and the PyTorch side of `jaxtl bench`. Module names match Peng's
state_dict keys. Needs PyTorch (`pip install jaxtl[bench]` or `[torch]`); jaxtl itself never imports it.
"""

from __future__ import annotations

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
