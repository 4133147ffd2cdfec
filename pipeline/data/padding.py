"""Token-id rows of different lengths -> one padded batch, on the side the consumer needs.

Right padding for scoring and training (a causal model's real tokens never attend to what follows them), left
padding for generation (every prompt ends where sampling starts).
"""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, *, side: str = "right") -> torch.Tensor:
    """(B, longest) long tensor of `sequences`, filled with `value` on `side` ("right" or "left")."""
    if side not in ("right", "left"):
        raise ValueError(f"side: {side!r} is not 'right' or 'left'")
    rows = [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in sequences]
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            out[i, span] = torch.tensor(row, dtype=torch.long)
    return out


def padded_batch(sequences: Sequence[Sequence[int]], pad_id: int, *, side: str = "right"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest): `sequences` padded with `pad_id` on `side`."""
    ids = pad_sequences(sequences, pad_id, side=side)
    mask = pad_sequences([[1] * len(s) for s in sequences], 0, side=side)
    return ids, mask


def padded_lm_batch(rows: Sequence[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows {"input_ids", "labels"} -> (input_ids, attention_mask, labels) padded on the right; padded labels are
    IGNORE_INDEX."""
    ids, mask = padded_batch([r["input_ids"] for r in rows], pad_id)
    return ids, mask, pad_sequences([r["labels"] for r in rows], IGNORE_INDEX)
