"""PyTorch twins of MTM's building blocks (official ``src/Models/MTM/model.py`` names); see
:mod:`jaxprvr.models.mtm`. The Mamba layers are the official ``mamba_ssm`` ones (:mod:`torch_ref.mamba`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from torch_ref.mamba import load as load_mamba

TCN_DROPOUT = 0.1
POOL_FILL = -1e9


class TCN(nn.Module):
    def __init__(self, hidden_size, dropout=TCN_DROPOUT):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.conv1 = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, padding=1)
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, x):
        y = self.dropout(self.relu(self.conv1(x.transpose(1, 2))))
        y = self.dropout(self.relu(self.conv2(y))).transpose(1, 2)
        return self.layer_norm(x + torch.clamp(self.alpha, 0.0, 1.0) * y)


def mamba_stack(d_model: int, num_layers: int) -> nn.ModuleList:
    """``nn.ModuleList([Mamba, LayerNorm] * num_layers)`` as ``MTM_Net`` builds ``clip_mamba``/``frame_mamba``."""
    mamba_cls = load_mamba().Mamba
    layers = []
    for _ in range(num_layers):
        layers.append(mamba_cls(d_model=d_model, d_state=16, d_conv=4, expand=2, use_fast_path=False))
        layers.append(nn.LayerNorm(d_model, eps=1e-5))
    return nn.ModuleList(layers)


def mamba_residual(layers: nn.ModuleList, h):
    m = h
    for i in range(0, len(layers), 2):
        m = layers[i + 1](layers[i](m))
    return h + m


class AttentionPooling(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.attn_proj = nn.Linear(hidden_size, 1)

    def forward(self, x, mask=None):
        scores = self.attn_proj(x)
        if mask is not None:
            scores = scores.masked_fill(mask.unsqueeze(2) == 0, POOL_FILL)
        return torch.sum(x * torch.softmax(scores, dim=1), dim=1)


class MLPReconstructor(nn.Module):
    def __init__(self, input_dim, output_dim, num_layers=2, hidden_dim_factor=2, dropout=0.1):
        super().__init__()
        layers, cur = [], input_dim
        for _ in range(num_layers - 1):
            nxt = min(int(cur * hidden_dim_factor), output_dim)
            layers += [nn.Linear(cur, nxt), nn.ReLU(), nn.Dropout(dropout)]
            cur = nxt
        layers.append(nn.Linear(cur, output_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        return self.mlp(x)
