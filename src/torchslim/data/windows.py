"""Token windows for language-model evaluation and calibration: a long run of token ids cut into fixed-length
windows. With ``stride`` equal to the length (the default) the windows do not overlap and every token after the
first of each window is scored; a smaller stride slides the windows so each scored token sees at least
``length - stride`` tokens of context, and only the last ``stride`` targets of a window are scored (the rest are
marked -100, which the language-modeling task skips).

Example:
    >>> import torch
    >>> batches = token_windows(torch.arange(10), length=4, batch_size=2)
    >>> [b["input_ids"].tolist() for b in batches]
    [[[0, 1, 2, 3], [4, 5, 6, 7]]]
    >>> sliding = token_windows(torch.arange(10), length=4, stride=2, batch_size=8)[0]
    >>> sliding["labels"].tolist()[1]
    [-100, -100, 4, 5]
"""

from __future__ import annotations

import torch

from torchslim.core.errors import TorchslimError

IGNORED = -100


class TokenWindows(list):
    """Batches of token windows: a list that says it is text, so that a verb given it without a task scores it as
    language modeling (next-token perplexity), not as classification of each token against itself."""

    kind = "text"


def token_windows(
    ids: torch.Tensor, length: int, stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8, start: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Batches ``{"input_ids", "labels"}`` of windows of ``length`` tokens from the 1-D ``ids`` (from ``start``),
    ``stride`` apart, at most ``max_tokens`` scored targets in all."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    stride = length if stride is None else stride
    if length < 2 or not 1 <= stride <= length:
        raise TorchslimError(f"token windows need length >= 2 and 1 <= stride <= length, got length {length}, stride {stride}")
    windows, labels, scored = [], [], 0
    position = start
    while position + length <= ids.numel() and (max_tokens is None or scored < max_tokens):
        window = ids[position : position + length]
        label = window.clone()
        if position > start and stride < length:
            label[: length - stride] = IGNORED  # context only: scored by the window before
        windows.append(window)
        labels.append(label)
        scored += int((label[1:] != IGNORED).sum())
        position += stride
    if not windows:
        raise TorchslimError(f"{ids.numel() - start} tokens do not fill one window of {length}")
    return TokenWindows(
        {"input_ids": torch.stack(windows[i : i + batch_size]), "labels": torch.stack(labels[i : i + batch_size])} for i in range(0, len(windows), batch_size)
    )


__all__ = ["TokenWindows", "token_windows"]
