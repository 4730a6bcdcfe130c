"""Pruning: importance criteria, masks (per layer or global), schedules, sparsity regularization, CSR storage, and
structured pruning that removes channels, neurons and heads."""

from torchslim.pruning.apply import get_mask, make_permanent, masks_of, set_mask
from torchslim.pruning.csr import CSRWeight, SparseLinear, to_csr
from torchslim.pruning.importance import WEIGHT_IMPORTANCE
from torchslim.pruning.regularize import HardConcreteGate, L0Regularizer, SparsityRegularizer
from torchslim.pruning.schedule import GradualPruning, IterativeConfig, iterative_prune, polynomial_sparsity, schedule_sparsities
from torchslim.pruning.structured import StructuredConfig, prune_channels
from torchslim.pruning.unstructured import PruneConfig, prune, prune_in_place

__all__ = [
    "CSRWeight",
    "GradualPruning",
    "HardConcreteGate",
    "IterativeConfig",
    "L0Regularizer",
    "PruneConfig",
    "SparseLinear",
    "SparsityRegularizer",
    "StructuredConfig",
    "WEIGHT_IMPORTANCE",
    "get_mask",
    "iterative_prune",
    "make_permanent",
    "masks_of",
    "polynomial_sparsity",
    "prune",
    "prune_channels",
    "prune_in_place",
    "schedule_sparsities",
    "set_mask",
    "to_csr",
]
