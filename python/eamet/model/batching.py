"""Right-padded batches of token-id lists, and length-sorted batching."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["length_sorted_batches", "pad_right"]


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, both (B, T) int64, padded on the right.

    Right padding keeps every real token at its unpadded position, so a fact-token index computed on the
    unpadded sequence stays valid and position ids need no adjustment.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def length_sorted_batches(
    lengths: Sequence[int], max_items: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (less padding): at most ``max_items`` sequences and,
    if given, at most ``max_tokens`` padded tokens per batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        width = lengths[i]  # the longest so far, as the order is increasing
        too_many = len(batch) >= max_items or (
            max_tokens is not None and (len(batch) + 1) * width > max_tokens
        )
        if batch and too_many:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
