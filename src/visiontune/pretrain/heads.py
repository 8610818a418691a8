"""The fresh SSL heads of extended pretraining: DINOv2's projection head and the iBOT mask token.

Released DINOv2 checkpoints hold the backbone only (no heads, no mask token), so ExPLoRA starts
these from scratch, trains them fully, and throws them away afterwards. Written here because timm
has no DINO head; the structure follows the DINO paper: an MLP to a bottleneck, L2 normalisation,
then a weight-normalised linear layer to K prototypes whose weight norm is fixed at 1, so the
logits are cosine similarities to the prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototype layer (norm fixed at 1).

    Args:
        in_dim: backbone feature width.
        out_dim: number of prototypes K.
        hidden_dim: MLP width.
        bottleneck_dim: width before the prototype layer.
        layers: linear layers in the MLP (the last one outputs ``bottleneck_dim``).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        # The norm ("g") is fixed at 1: only the directions of the prototypes are learned.
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the prototype layer (frozen for the first steps, as in DINO)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]


class SSLHeads(nn.Module):
    """Everything the student trains besides the backbone: the DINO/iBOT head and the mask token.

    Args:
        dim: backbone feature width.
        prototypes: K.
        hidden_dim: head MLP width.
        bottleneck_dim: head bottleneck.
        layers: head MLP depth.
    """

    def __init__(self, dim: int, prototypes: int, hidden_dim: int, bottleneck_dim: int, layers: int):
        super().__init__()
        # One head for both losses: DINOv2's default (ibot.separate_head=false).
        self.head = DINOHead(dim, prototypes, hidden_dim, bottleneck_dim, layers)
        # Replaces masked patch embeddings in the student's input; zeros as in DINOv2.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
