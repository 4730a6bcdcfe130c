"""A CSR storage view of pruned weights: its stored bytes, and a Linear that computes with it."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class CSRWeight:
    """Compressed sparse rows of a 2-D weight (conv weights are viewed as (out, in * kh * kw))."""

    shape: tuple[int, ...]
    values: torch.Tensor  # (nnz,)
    column_indices: torch.Tensor  # (nnz,) in the narrowest integer type that fits
    row_pointers: torch.Tensor  # (rows + 1,)

    @property
    def nonzeros(self) -> int:
        return self.values.numel()

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.column_indices, self.row_pointers))

    def to_dense(self) -> torch.Tensor:
        rows = self.row_pointers.numel() - 1
        columns = int(torch.tensor(self.shape[1:]).prod()) if len(self.shape) > 1 else 1
        dense = torch.sparse_csr_tensor(self.row_pointers.long(), self.column_indices.long(), self.values, (rows, columns)).to_dense()
        return dense.reshape(self.shape)


def _index_dtype(limit: int) -> torch.dtype:
    for dtype in (torch.int16, torch.int32):
        if limit <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def to_csr(weight: torch.Tensor) -> CSRWeight:
    """CSR of a weight's non-zeros, with indices as narrow as the dimensions allow.

    Example:
        >>> csr = to_csr(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
        >>> csr.nonzeros, csr.stored_bytes          # 2 fp32 values + 2 int16 columns + 3 int16 row pointers
        (2, 18)
    """
    matrix = weight.detach().reshape(weight.shape[0], -1)
    sparse = matrix.to_sparse_csr()
    return CSRWeight(
        shape=tuple(weight.shape),
        values=sparse.values().clone(),
        column_indices=sparse.col_indices().to(_index_dtype(matrix.shape[1])),
        row_pointers=sparse.crow_indices().to(_index_dtype(sparse.values().numel())),
    )


class SparseLinear(nn.Module):
    """A Linear whose weight is held and multiplied in CSR form (torch.sparse), for measured sparse latency."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to_sparse_csr(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        out = torch.sparse.mm(self.weight, flat.t()).t()  # (N, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)
