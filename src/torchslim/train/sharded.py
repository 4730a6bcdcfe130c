"""Fully sharded data parallel training (FSDP2, ``fully_shard``) for models whose weights, gradients and optimizer
state do not fit one device together.

Under ``torchrun`` with ``parallel: fsdp`` in a training config, ``fit`` shards the model in place: every block (a
Hugging Face model's decoder layers, the members of ``nn.ModuleList`` / ``nn.Sequential`` containers) becomes one
FSDP unit, the rest of the model the root unit. Each rank then keeps 1/N of every parameter, of its gradient and of
the optimizer's state; a unit's full weights exist only while that unit runs forward or backward. Masks
(parametrizations) and buffers stay whole on every rank, so pruned weights stay exactly zero.

The module objects stay the same, so callbacks and references a caller holds keep working. When training ends (and
around a checkpoint between epochs) the model is released: the full weights are gathered onto every rank and the
model becomes the plain module it was, with the optimizer's state gathered to match.

This uses FSDP2 beyond its public API in one place: releasing a module (FSDP2 has no way to undo ``fully_shard``).
``tests/train/test_distributed.py`` checks it on every run.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from torchslim.core.errors import TorchslimError


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks that become FSDP units of their own, outermost first and never nested: the classes a Hugging Face
    model names as not to be split (its decoder layers), else the members of every ``nn.ModuleList`` and
    ``nn.Sequential`` that hold parameters. Everything else belongs to the root unit."""
    keep_whole = set(getattr(model, "_no_split_modules", None) or ())
    chosen: list[nn.Module] = []
    taken: set[int] = set()

    def visit(module: nn.Module, inside_container: bool) -> None:
        for child in module.children():
            if id(child) in taken:
                continue
            named = type(child).__name__ in keep_whole
            if (named or (inside_container and not keep_whole)) and any(True for _ in child.parameters()):
                chosen.append(child)
                taken.update(id(m) for m in child.modules())
                continue
            visit(child, isinstance(child, (nn.ModuleList, nn.Sequential)))

    visit(model, isinstance(model, (nn.ModuleList, nn.Sequential)))
    return chosen


def _optimizer_swap(optimizer: torch.optim.Optimizer, replace: dict[int, nn.Parameter], convert: Callable[[torch.Tensor, nn.Parameter], torch.Tensor]) -> None:
    """Point the optimizer at the replacement parameters and convert its state tensors to match them."""
    state: collections.defaultdict[torch.Tensor, dict] = collections.defaultdict(dict)
    for group in optimizer.param_groups:
        new_params = []
        for parameter in group["params"]:
            new = replace.get(id(parameter), parameter)
            new_params.append(new)
            if parameter in optimizer.state:
                state[new] = {
                    key: convert(value, new) if isinstance(value, torch.Tensor) and value.shape == parameter.shape and value.dim() > 0 else value
                    for key, value in optimizer.state[parameter].items()
                }
        group["params"] = new_params
    optimizer.state = state


class Sharded:
    """A model sharded in place with FSDP2 for training, and released back to a plain module afterwards."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        with torch.no_grad():  # start identical on every rank, as DistributedDataParallel does
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, 0)
        self.shard()

    def shard(self) -> None:
        from torch.distributed.fsdp import fully_shard

        names = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        device = next(self.model.parameters()).device
        mesh = None
        if device.type == "cuda":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cuda", (dist.get_world_size(),))
        try:
            for unit in shard_units(self.model):
                fully_shard(unit, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        except (AssertionError, RuntimeError, ValueError, TypeError) as error:
            raise TorchslimError(f"parallel fsdp: this model cannot be sharded with FSDP ({type(error).__name__}: {error}); use parallel: ddp") from None
        now = dict(self.model.named_parameters(remove_duplicate=False))
        replace = {old: now[name] for old, name in names.items() if name in now}
        _optimizer_swap(self.optimizer, replace, _distribute_like)

    def release(self) -> None:
        """Gather the full weights and optimizer state onto every rank and make the model a plain module again."""
        import importlib

        contract = importlib.import_module("torch.distributed._composable.contract")
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        owners = [
            (module, attribute, parameter)
            for module in self.model.modules()
            for attribute, parameter in module._parameters.items()
            if isinstance(parameter, DTensor)
        ]
        full: dict[int, nn.Parameter] = {}
        for _, _, parameter in owners:  # the same order on every rank: each gather is a collective
            if id(parameter) not in full:
                full[id(parameter)] = nn.Parameter(parameter.full_tensor().detach().clone(), requires_grad=parameter.requires_grad)
        _optimizer_swap(self.optimizer, full, lambda value, _: value.full_tensor() if isinstance(value, DTensor) else value)
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                state = module._get_fsdp_state()
                for handle in {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle)}.values():
                    handle.remove()
                for group in state._fsdp_param_groups:
                    for handles in (group._module_to_pre_save_state_dict_hook_handle, group._module_to_pre_load_state_dict_hook_handle):
                        for handle in handles.values():
                            handle.remove()
                        handles.clear()
                module.__class__ = type(module).__mro__[FSDPModule._orig_cls_mro_index]
                _module_state_mapping.pop(module, None)
            for key in (contract.STATE_KEY, contract.REGISTRY_KEY, "_is_fsdp_managed_module", "_fsdp_use_orig_params"):
                module.__dict__.pop(key, None)
        for module, attribute, parameter in owners:
            module._parameters[attribute] = full[id(parameter)]


def held_fraction(model: nn.Module) -> float:
    """The part of the model's parameter elements this process holds: 1.0 unsharded, about 1/N sharded over N."""
    from torch.distributed.tensor import DTensor

    total = held = 0
    for parameter in model.parameters():
        total += parameter.numel()
        held += parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
    return held / max(1, total)


def _distribute_like(value: torch.Tensor, parameter: nn.Parameter) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(parameter, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(parameter.device), parameter.device_mesh, parameter.placements)
    return value


__all__ = ["Sharded", "held_fraction", "shard_units"]
