"""Low-rank factorization: a layer's weight replaced by a product of thinner ones.

- ``Linear`` (out x in) by truncated SVD: ``Linear(in, r) -> Linear(r, out)``, each factor holding sqrt(S).
- ``Conv2d`` by SVD of the kernel reshaped to (out, in*kh*kw) ("svd"): a kh x kw conv with r filters (the original
  stride, padding and dilation) followed by a 1x1 conv to the outputs.
- ``Conv2d`` by Tucker-2 ("tucker2", Kim et al. 2016): a 1x1 conv to r_in channels, the kh x kw core conv to r_out
  channels, a 1x1 conv to the outputs; factors by higher-order SVD refined by a few HOOI sweeps.

Ranks come from a fixed ``rank``, the ``energy`` of the singular values kept, or a target ``ratio`` of the selected
layers' parameters (or MACs), met by one energy threshold found by bisection, so that layers whose spectrum decays
slowly keep more. A layer whose factorized form would cost as much as the original is left and named. The factorized
layers are plain ``nn.Linear`` / ``nn.Conv2d`` inside a ``Sequential`` subclass, so they export to ONNX, quantize and
prune like any other; the model's spec records each factorization, so a saved file loads back.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> result = factorize(model, {"rank": 8, "layers": {"include": ["0"]}}, example_input=torch.zeros(1, 64))
    >>> type(result.model[0]).__name__, result.report.stages[0].layers[0]["rank"]
    ('FactorizedLinear', 8)
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from torchslim.compression.common import Transforming, TransformOptions, other_weights_note
from torchslim.core.config import Config, ConfigError, check
from torchslim.core.errors import TorchslimError
from torchslim.core.report import Report, Result, Stage
from torchslim.core.selector import LayerSelector, move_hooks, resolve_overrides, select_modules, set_module_everywhere
from torchslim.core.spec import append_transform, recorded_layers, register_transform
from torchslim.core.ties import tied_weights
from torchslim.measure.counts import count_macs, count_parameters
from torchslim.pruning.apply import masks_of
from torchslim.quantization.modules import is_transposed_linear, own_forward
from torchslim.tasks.batches import run_failure

TRANSFORM_KIND = "factorize"
DEFAULT_ENERGY = 0.9  # the energy kept when no rank, energy or ratio is given
FORMS = ("auto", "svd", "tucker2")


@dataclasses.dataclass(frozen=True)
class FactorizeConfig(Config):
    """How to factorize. At most one of ``rank`` (every selected layer; Tucker-2 uses it for both inner widths),
    ``energy`` (keep this fraction of each layer's squared singular values; 0.9 when none is given) or ``ratio`` (the factorized layers
    together keep this fraction of the selected layers' ``by``: "parameters" or "macs"). ``overrides`` gives a layer
    its own rank (an integer) or energy (a fraction); ``rank_shares`` gives a layer its rank as a fraction of its full
    rank as the layer is when the stage runs (after channel pruning, of the narrower layer). ``method``: "svd", "tucker2" (convolutions; Linear layers use
    SVD) or "auto" (SVD for Linear and 1x1 convolutions, Tucker-2 for larger kernels). ``min_saving``: a layer is left
    unless its factorized form saves at least this fraction of its cost. ``layers``: which Linear / Conv2d layers."""

    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    by: str = "parameters"
    method: str = "auto"
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    rank_shares: dict[str, float] = dataclasses.field(default_factory=dict)
    layers: LayerSelector = LayerSelector()
    min_saving: float = 0.0
    tucker_iterations: int = 2

    def validate(self) -> None:
        given = [name for name in ("rank", "energy", "ratio") if getattr(self, name) is not None]
        check(len(given) <= 1, f"give at most one of rank, energy or ratio (got {', '.join(given)}); with none, {DEFAULT_ENERGY} of the energy is kept")
        check(self.rank is None or self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        check(self.energy is None or 0.0 < self.energy <= 1.0, f"energy must be in (0, 1], got {self.energy}")
        check(self.ratio is None or 0.0 < self.ratio < 1.0, f"ratio must be in (0, 1), got {self.ratio}")
        check(self.by in ("parameters", "macs"), f"by must be 'parameters' or 'macs', got {self.by!r}")
        check(self.method in FORMS, f"method must be one of {', '.join(FORMS)}, got {self.method!r}")
        check(0.0 <= self.min_saving < 1.0, f"min_saving must be in [0, 1), got {self.min_saving}")
        check(self.tucker_iterations >= 0, f"tucker_iterations must be >= 0, got {self.tucker_iterations}")
        for name, value in self.overrides.items():
            ok = (float(value).is_integer() and value >= 1) or 0.0 < value < 1.0
            check(ok, f"overrides[{name!r}] must be a rank (an integer >= 1) or an energy in (0, 1), got {value}")
        for name, value in self.rank_shares.items():
            check(0.0 < value <= 1.0, f"rank_shares[{name!r}] must be a fraction of the layer's full rank in (0, 1], got {value}")
            check(name not in self.overrides, f"{name!r} is in both overrides and rank_shares; give it one rank")


class FactorizedLinear(nn.Sequential):
    """A Linear replaced by ``Linear(in, rank, bias=False) -> Linear(rank, out)``."""

    form = "svd"


class FactorizedConv2d(nn.Sequential):
    """A Conv2d replaced by thinner convolutions: ``svd`` (kh x kw conv to r filters, then 1x1) or ``tucker2`` (1x1 to
    r_in, kh x kw core to r_out, 1x1 to the outputs)."""

    def __init__(self, *layers: nn.Module, form: str) -> None:
        super().__init__(*layers)
        self.form = form


@dataclasses.dataclass
class _Plan:
    """One layer's decomposition: its singular values (both unfoldings for Tucker-2) and costs."""

    name: str
    module: nn.Module
    form: str
    spectra: list[torch.Tensor]  # one spectrum (svd) or [outputs, inputs] (tucker2)
    positions: int  # output positions per example (1 for a Linear on a vector)
    stride_area: int  # input positions per output position (a strided conv's first 1x1 runs on the input)

    @property
    def weight(self) -> torch.Tensor:
        return _matrix(self.module)

    def cost(self, ranks: list[int], by: str) -> int:
        out, inp = self.weight.shape[0], self.weight.shape[1]
        area = int(math.prod(self.weight.shape[2:])) if self.weight.dim() > 2 else 1
        if self.form == "svd":
            per = ranks[0] * (inp * area + out)
            return int(per * (self.positions if by == "macs" else 1))
        r_out, r_in = ranks
        if by == "macs":
            return int((inp * r_in * self.stride_area + r_in * r_out * area + r_out * out) * self.positions)
        return int(inp * r_in + r_in * r_out * area + r_out * out)

    def dense_cost(self, by: str) -> int:
        return self.weight.numel() * (self.positions if by == "macs" else 1)

    def ranks_for(self, value: float, as_energy: bool = False) -> list[int]:
        """Ranks for an override or setting: an integer rank, or (below 1, or any value with ``as_energy``) the
        smallest ranks keeping ``value`` of the energy."""
        if value >= 1 and not as_energy:
            return [min(int(value), spectrum.numel()) for spectrum in self.spectra]
        ranks = []
        for spectrum in self.spectra:
            energy = spectrum.double().pow(2)
            kept = torch.cumsum(energy, 0) / energy.sum().clamp_min(1e-30)
            ranks.append(min(int(torch.searchsorted(kept, torch.tensor(value, dtype=torch.float64, device=kept.device) - 1e-12).item()) + 1, spectrum.numel()))
        return ranks

    def energy_kept(self, ranks: list[int]) -> float:
        """The least fraction of squared singular values kept over the modes (cumulative sums computed once)."""
        if not hasattr(self, "_kept"):
            self._kept = [(torch.cumsum(s.double().pow(2), 0) / s.double().pow(2).sum().clamp_min(1e-30)).tolist() for s in self.spectra]
        return min(kept[min(r, len(kept)) - 1] for kept, r in zip(self._kept, ranks))


# torch's own modules that read a child layer's weight instead of calling it (multi-head attention's output
# projection; the encoder / decoder layers' fused fast path in eval mode): a factorized child would break them
READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def weight_reader(model: nn.Module, name: str) -> str | None:
    """The class of the torch module that reads layer ``name``'s weight directly (None: it is called as a layer)."""
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else None
    return type(parent).__name__ if isinstance(parent, READS_WEIGHTS) else None


def _matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (outputs, inputs, ...)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.T if is_transposed_linear(module) else weight


def _form(module: nn.Module, method: str) -> str | None:
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return "svd"
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return None
    if method == "auto":
        return "svd" if module.kernel_size == (1, 1) else "tucker2"
    return method


def _unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def _plan(name: str, module: nn.Module, form: str, positions: int) -> _Plan:
    weight = _matrix(module).detach().double()
    if form == "svd":
        spectra = [torch.linalg.svdvals(weight.reshape(weight.shape[0], -1))]
    else:
        spectra = [torch.linalg.svdvals(_unfold(weight, 0)), torch.linalg.svdvals(_unfold(weight, 1))]
    stride = getattr(module, "stride", (1, 1))
    return _Plan(name, module, form, spectra, max(1, positions), int(stride[0] * stride[1]))


def _leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank]


def _structure(module: nn.Module, form: str, ranks: list[int]) -> nn.Module:
    """The factorized module for ``module`` at ``ranks``, with uninitialized weights (the bias goes on the last layer)."""
    bias = module.bias is not None
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        outputs, inputs = _matrix(module).shape
        return FactorizedLinear(nn.Linear(inputs, ranks[0], bias=False), nn.Linear(ranks[0], outputs, bias=bias))
    assert isinstance(module, nn.Conv2d)
    if form == "svd":
        first = _conv_like(module, module.in_channels, ranks[0], spatial=True)
        return FactorizedConv2d(first, _conv_like(module, ranks[0], module.out_channels, bias=bias), form="svd")
    r_out, r_in = ranks
    layers = (
        _conv_like(module, module.in_channels, r_in),
        _conv_like(module, r_in, r_out, spatial=True),
        _conv_like(module, r_out, module.out_channels, bias=bias),
    )
    return FactorizedConv2d(*layers, form="tucker2")


def _build(plan: _Plan, ranks: list[int], iterations: int) -> tuple[nn.Module, float]:
    """The factorized module for ``plan`` at ``ranks`` with the decomposition's weights, and its relative weight error."""
    module, original = plan.module, plan.weight
    weight = original.detach().double()
    built = _structure(module, plan.form, ranks)
    layers = list(built.children())
    if plan.form == "svd":
        rank = ranks[0]
        u, s, vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1), full_matrices=False)
        root = s[:rank].sqrt()
        factors = [root[:, None] * vh[:rank], u[:, :rank] * root[None, :]]
        approx = (factors[1] @ factors[0]).reshape(weight.shape)
    else:
        r_out, r_in = ranks
        u_out, u_in = _leading(_unfold(weight, 0), r_out), _leading(_unfold(weight, 1), r_in)
        for _ in range(iterations):  # HOOI: each factor from the weight projected on the other
            u_out = _leading(_unfold(torch.einsum("oikl,is->oskl", weight, u_in), 0), r_out)
            u_in = _leading(_unfold(torch.einsum("oikl,or->rikl", weight, u_out), 1), r_in)
        core = torch.einsum("oikl,or,is->rskl", weight, u_out, u_in)
        approx = torch.einsum("rskl,or,is->oikl", core, u_out, u_in)
        factors = [u_in.T, core, u_out]
    for layer, factor in zip(layers, factors):
        layer.weight.data.copy_(factor.reshape(layer.weight.shape).to(original.dtype))
    if module.bias is not None:
        layers[-1].bias.data.copy_(module.bias.detach())
    error = float((weight - approx).norm() / weight.norm().clamp_min(1e-30))
    return built.to(original.device), error


def _conv_like(conv: nn.Conv2d, inputs: int, outputs: int, spatial: bool = False, bias: bool = False) -> nn.Conv2d:
    """A conv from ``inputs`` to ``outputs`` channels: with ``spatial`` the original's kernel, stride, padding and
    dilation, else 1x1."""
    module: Any = conv
    if spatial:
        return nn.Conv2d(
            inputs,
            outputs,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            bias=bias,
            padding_mode=module.padding_mode,
        )
    return nn.Conv2d(inputs, outputs, 1, bias=bias)


def _overridden(selected: list[tuple[str, nn.Module]], plans: list[_Plan], config: FactorizeConfig) -> dict[str, list[int]]:
    """The ranks ``overrides`` (a rank or an energy) and ``rank_shares`` (a fraction of the full rank) give layers,
    the most specific pattern winning; a name pattern that picks none of the selected layers is an error."""
    values = resolve_overrides(selected, config.overrides, "factorize.overrides")
    shares = resolve_overrides(selected, config.rank_shares, "factorize.rank_shares")
    both = sorted(set(values) & set(shares))
    if both:
        raise ConfigError(f"factorize: {both[0]!r} is picked by both overrides and rank_shares; give it one rank")
    fixed = {p.name: p.ranks_for(float(values[p.name])) for p in plans if p.name in values}
    return fixed | {p.name: [max(1, round(shares[p.name] * spectrum.numel())) for spectrum in p.spectra] for p in plans if p.name in shares}


def _choose(plans: list[_Plan], config: FactorizeConfig, fixed: dict[str, list[int]]) -> dict[str, list[int]]:
    """Ranks per layer from the config (``fixed``: those overrides give). A ``ratio`` is met greedily: starting from
    every layer whole, each move takes the layer whose next cut loses the least relative energy per unit of cost saved
    (first to the rank where its factorized form breaks even, then one singular value at a time), until the selected
    layers fit the budget."""
    if config.ratio is None:
        if config.rank is not None:
            return fixed | {p.name: p.ranks_for(float(config.rank)) for p in plans if p.name not in fixed}
        energy = config.energy if config.energy is not None else DEFAULT_ENERGY  # 1.0: all of it, not rank 1
        return fixed | {p.name: p.ranks_for(energy, as_energy=True) for p in plans if p.name not in fixed}
    by = config.by
    state: dict[str, list[int] | None] = {p.name: fixed.get(p.name) for p in plans}  # None: whole
    plan_of = {p.name: p for p in plans}

    def cost(name: str) -> int:
        ranks, plan = state[name], plan_of[name]
        return plan.dense_cost(by) if ranks is None else min(plan.cost(ranks, by), plan.dense_cost(by))

    def moves(name: str) -> list[tuple[float, list[int]]]:
        """(energy lost per unit of cost saved, new ranks) of each move open to a layer."""
        plan, ranks = plan_of[name], state[name]
        if name in fixed:
            return []
        if ranks is None:  # whole -> the highest ranks (equal energy in both modes) that cost less than the layer
            for energy in (1 - k / 200 for k in range(1, 200)):
                trial = plan.ranks_for(energy)
                if plan.cost(trial, by) < plan.dense_cost(by):
                    saved = plan.dense_cost(by) - plan.cost(trial, by)
                    return [((1 - plan.energy_kept(trial)) / saved, trial)]
            return []
        out = []
        for mode, rank in enumerate(ranks):
            if rank > 1:
                trial = ranks[:mode] + [rank - 1] + ranks[mode + 1 :]
                saved = plan.cost(ranks, by) - plan.cost(trial, by)
                lost = plan.energy_kept(ranks) - plan.energy_kept(trial)
                out.append((lost / max(saved, 1), trial))
        return out

    budget = config.ratio * sum(p.dense_cost(by) for p in plans)
    while sum(cost(name) for name in state) > budget:
        options = [(score, name, trial) for name in state for score, trial in moves(name)]
        if not options:
            reachable = sum(cost(name) for name in state) / sum(p.dense_cost(by) for p in plans)
            raise TorchslimError(f"factorize: a ratio of {config.ratio} of the selected layers' {by} is out of reach; rank 1 everywhere gives {reachable:.3f}")
        _, name, trial = min(options, key=lambda option: option[0])
        state[name] = trial
    return {name: ranks for name, ranks in state.items() if ranks is not None}


def _positions(model: nn.Module, example: Any, names: list[str]) -> dict[str, int]:
    """Output positions per example of each named layer (MACs / weight elements, from one traced forward)."""
    if example is None:
        return {}
    macs = {row["name"]: row["macs"] for row in count_macs(model, example)["layers"]}
    modules = dict(model.named_modules())
    return {name: max(1, round(macs.get(name, 0) / max(1, modules[name].weight.numel()))) for name in names}


def factorize(model: nn.Module, config: FactorizeConfig | dict, **options: Unpack[TransformOptions]) -> Result:
    """Factorize the selected Linear and Conv2d layers of a copy of ``model`` (the original stays as it was unless
    ``inplace``), then fine-tune when ``finetune`` is given (needs ``data``); ``options`` are ``TransformOptions``
    (data, example_input, task, finetune, inplace, progress). The report gives each layer's form, ranks, energy kept,
    weight error and parameters before and after, the layers left whole and why, and parameters and MACs of the model
    before and after; with ``data``, the task's metrics before, right after factorizing and after fine-tuning."""
    config = FactorizeConfig.coerce(config, where="factorize")
    run = Transforming.start("factorize", model, options)
    target, example = run.target, run.example
    started = time.perf_counter()
    chosen = select_modules(target, config.layers, default_types=("Linear", "Conv2d", "Conv1D"))
    notes: list[str] = [note] if (note := other_weights_note(target, config.layers, "not factorized")) else []
    candidates = []
    ties = tied_weights(target)
    for name, module in chosen:
        form = _form(module, config.method)
        # a weight another layer holds too (a tied embedding and head; not this layer under a second name)
        tied = sorted({other.rpartition(".")[0] or other for other in ties.get(name, []) if target.get_submodule(other.rpartition(".")[0]) is not module})
        if tied:
            notes.append(f"{name}: left whole (its weight is tied to {', '.join(tied)}: factorizing it would untie it and add a copy)")
        elif form is None:
            notes.append(f"{name}: {type(module).__name__} with groups={getattr(module, 'groups', 1)} is not factorized (grouped / depthwise)")
        elif (reader := weight_reader(target, name)) is not None:
            notes.append(f"{name}: left whole (torch's {reader} reads its weight directly rather than calling it)")
        elif getattr(module, "parametrizations", None) is not None and name in masks_of(target):
            raise TorchslimError(f"factorize: {name} carries a pruning mask; call torchslim.make_permanent(model) first")
        elif getattr(module, "parametrizations", None) is not None:
            kinds = sorted({type(p).__name__ for plist in module.parametrizations.values() for p in plist})
            notes.append(f"{name}: left whole (its weight is computed by a parametrization: {', '.join(kinds)})")
        elif (own := own_forward(module)) is not None:
            notes.append(f"{name}: left whole ({type(module).__name__} has its own {own}, which two plain factor layers would not run)")
        else:
            candidates.append((name, module, form))
    if config.by == "macs" and example is None:
        raise ConfigError("factorize: by='macs' needs data or example_input to count MACs")
    positions = _positions(target, example, [name for name, _, _ in candidates])
    plans = [_plan(name, module, form, positions.get(name, 1)) for name, module, form in candidates]
    ranks = _choose(plans, config, _overridden(chosen, plans, config))
    before = {"parameters": count_parameters(target), "macs": int(count_macs(target, example)["total"]) if example is not None else None}
    baseline = run.evaluate("_before")
    rows, record, built_layers = [], {}, {}
    for plan in plans:
        if plan.name not in ranks:
            notes.append(f"{plan.name}: left whole (the budget was met without it)")
            continue
        layer_ranks = ranks[plan.name]
        dense, factored = plan.dense_cost(config.by), plan.cost(layer_ranks, config.by)
        if factored > (1.0 - config.min_saving) * dense or factored >= dense:
            notes.append(f"{plan.name}: left whole; rank {'/'.join(map(str, layer_ranks))} would cost {factored:,} {config.by} against {dense:,}")
            continue
        built, error = _build(plan, layer_ranks, config.tucker_iterations)
        if (note := move_hooks(plan.name, target.get_submodule(plan.name), built, "factorized")) is not None:
            notes.append(note)
        aliases = set_module_everywhere(target, plan.name, built)  # a layer registered under two names stays shared
        record[plan.name], built_layers[plan.name] = {"form": plan.form, "ranks": layer_ranks}, (plan.module, built)
        if len(aliases) > 1:
            notes.append(f"{plan.name}: the same layer as {', '.join(a for a in aliases if a != plan.name)}, factorized once for all of them")
        rows.append(
            {
                "name": plan.name,
                "type": type(plan.module).__name__,
                "form": plan.form,
                "rank": layer_ranks[0] if len(layer_ranks) == 1 else "/".join(map(str, layer_ranks)),
                "energy_kept": round(plan.energy_kept(layer_ranks), 4),
                "weight_error": round(error, 4),
                "parameters_before": plan.module.weight.numel(),
                "parameters_after": sum(p.numel() for n, p in built.named_parameters() if n.endswith("weight")),
            }
        )
    if record and example is None:
        notes.append("not checked: without data or example_input the factorized model was not run (a module reading a layer's weight would fail)")
    if record and example is not None and run_failure(target, example) is not None:
        # a module of the user's reads a replaced layer's weight or attributes instead of calling it: those layers stay whole
        for name in record:
            _swap(target, name, *reversed(built_layers[name]))
        for name in list(record):
            _swap(target, name, *built_layers[name])
            if (failure := run_failure(target, example)) is not None:
                _swap(target, name, *reversed(built_layers[name]))
                del record[name]
                rows = [row for row in rows if row["name"] != name]
                notes = [note for note in notes if not note.startswith(f"{name}: its ")] + [
                    f"{name}: left whole (the model fails with it factorized: {failure}; some module reads its weight or attributes instead of calling it)"
                ]
        if record and (failure := run_failure(target, example)) is not None:
            for name in record:
                _swap(target, name, *reversed(built_layers[name]))
            raise TorchslimError(f"factorize: the model no longer runs with {', '.join(record)} factorized ({failure}); the model is unchanged")
    if record:
        append_transform(target, {"kind": TRANSFORM_KIND, "layers": record})
    metrics: dict[str, Any] = {
        "parameters_before": before["parameters"],
        "parameters": count_parameters(target),
        "layers_factorized": len(record),
    }
    metrics["parameter_ratio"] = metrics["parameters_before"] / max(1, metrics["parameters"])
    if example is not None:
        metrics["macs_before"], metrics["macs"] = before["macs"], int(count_macs(target, example)["total"])
        metrics["macs_ratio"] = metrics["macs_before"] / max(1, metrics["macs"])
    metrics.update(baseline)
    metrics.update(run.evaluate("_factorized"))
    notes += run.finetune()
    metrics.update(run.evaluate())
    metrics["factorize_seconds"] = time.perf_counter() - started
    stage = Stage(
        name="factorize", kind="factorize", metrics=metrics, layers=rows, notes=notes, config=config.to_dict(), execution="eager, factorized dense layers"
    )
    return Result(model=target, report=Report.for_model(model, [stage]))


def _swap(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """``new`` in place of ``old`` under every name ``old`` has, the user's hooks moved along."""
    move_hooks(name, old, new, "factorized")
    set_module_everywhere(model, name, new)


@register_transform(TRANSFORM_KIND)
def apply_factorization(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """Rebuild the factorized layers a saved file lists (their weights come from the file)."""
    for name, module, entry in recorded_layers(model, transform, "factorizes"):
        form, ranks = entry.get("form") if isinstance(entry, dict) else None, entry.get("ranks") if isinstance(entry, dict) else None
        if form not in ("svd", "tucker2") or not isinstance(ranks, list) or not all(isinstance(r, int) and r >= 1 for r in ranks):
            raise TorchslimError(f"the file's factorization of {name!r} needs a form (svd or tucker2) and positive integer ranks, got {entry!r}")
        if _form(module, "svd" if form == "svd" else "tucker2") is None or len(ranks) != (1 if form == "svd" else 2):
            raise TorchslimError(f"the file factorizes {name!r} ({type(module).__name__}) as {form} with ranks {ranks}, which does not fit that layer")
        set_module_everywhere(model, name, _structure(module, form, ranks).to(next(module.parameters()).device))
    return model


__all__ = ["READS_WEIGHTS", "FactorizeConfig", "FactorizedConv2d", "FactorizedLinear", "apply_factorization", "factorize", "weight_reader"]
