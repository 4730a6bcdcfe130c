"""Pruning: importance criteria, masks (per layer or global, in one step or several), schedules, sparsity
regularization, sparse variational dropout (per-layer sparsity learned), CSR storage, and structured pruning that removes channels, neurons and heads.

The structure API is public: ``trace(model, example)`` gives the ``ChannelGraph`` of coupled channel ``Group``s
and attention ``HeadGroup``s; ``select_groups`` / ``select_heads`` choose what to remove; ``remove_channels``
slices it out.
"""

from torchslim.pruning.apply import get_mask, hold_zeros, make_permanent, masks_of, set_mask
from torchslim.pruning.csr import CSRWeight, SparseLinear, to_csr
from torchslim.pruning.graph import ChannelGraph, Group, HeadGroup, ParamSlice
from torchslim.pruning.importance import GROUP_IMPORTANCE, WEIGHT_IMPORTANCE, Criterion, group_criterion, weight_criterion
from torchslim.pruning.regularize import HardConcreteGate, L0Regularizer, SparsityRegularizer
from torchslim.pruning.removal import apply_structure, remove_channels, zero_readers
from torchslim.pruning.removal_checks import check_removal
from torchslim.pruning.schedule import GradualPruning, polynomial_sparsity, schedule_sparsities
from torchslim.pruning.structured import StructuredConfig, prune_channels, select_groups, select_heads
from torchslim.pruning.tracing import trace
from torchslim.pruning.unstructured import PruneConfig, prune, prune_in_place
from torchslim.pruning.variational import SparseVariationalDropout, VariationalConfig, sparsify_variational

__all__ = [
    "GROUP_IMPORTANCE",
    "WEIGHT_IMPORTANCE",
    "CSRWeight",
    "ChannelGraph",
    "Criterion",
    "GradualPruning",
    "Group",
    "HardConcreteGate",
    "HeadGroup",
    "L0Regularizer",
    "ParamSlice",
    "PruneConfig",
    "SparseLinear",
    "SparseVariationalDropout",
    "SparsityRegularizer",
    "StructuredConfig",
    "VariationalConfig",
    "apply_structure",
    "check_removal",
    "get_mask",
    "group_criterion",
    "hold_zeros",
    "make_permanent",
    "masks_of",
    "polynomial_sparsity",
    "prune",
    "prune_channels",
    "prune_in_place",
    "remove_channels",
    "schedule_sparsities",
    "select_groups",
    "select_heads",
    "set_mask",
    "sparsify_variational",
    "to_csr",
    "trace",
    "weight_criterion",
    "zero_readers",
]
