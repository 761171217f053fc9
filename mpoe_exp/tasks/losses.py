"""The token-level loss every text-to-text and language-modeling task trains with."""

from __future__ import annotations

import torch


def token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over labels != -100, computed in fp32 (also under autocast). logits (B, T, V), labels
    (B, T)."""
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )
