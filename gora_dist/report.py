"""What GoRA decided and why (per-layer importance, rank, size and projection error, the budget), and
the plan that carries it with the initial adapters: the records every layer of the package shares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from gora_dist.config import GoRAConfig


@dataclass
class LayerReport:
    """One adapted (or considered) layer. ``shape`` is (out, in) like ``nn.Linear.weight``."""

    name: str
    shape: Tuple[int, int]
    importance: float
    advantage: float
    rank: int
    params: int
    projection_error: Optional[float] = None
    """‖ΔW0 + γ√(in/r)Ḡ‖/‖γ√(in/r)Ḡ‖: how much of the gradient step A0's row space cannot hold."""


@dataclass
class GoRAReport:
    """Returned by ``apply_gora``; saved as ``gora.json`` beside the adapter."""

    config: GoRAConfig
    layers: Dict[str, LayerReport]
    grad_steps: int
    """Gradient steps actually averaged (fewer than ``config.grad_steps`` only with adaptive N)."""
    gamma: float
    """γ actually used (the chosen one with adaptive γ; 0 if no candidate beat the base loss)."""
    rank_budget: float
    """b = Σ f(m_i, n_i)·r_ref in the units of ``config.rank_features``."""
    param_budget: int
    """Trainable parameters of plain LoRA at ``rank_ref`` on the same layers."""
    param_count: int
    """Trainable parameters GoRA's adapters actually have."""
    notes: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    """Seconds of the gradient steps (``gradient_s``) and of everything after (``init_s``), and the
    payload bytes this rank handed to GoRA's own collectives (``bytes_communicated``)."""
    accumulator_elements: int = 0
    """Float32 gradient-sum elements this rank held: its shard of the target weights."""
    intrinsic_dimensions: List[float] = field(default_factory=list)
    """With allocator=gelora: TwoNN ID of the embeddings and of each block's output."""
    gamma_search: List[Tuple[float, float]] = field(default_factory=list)
    """(γ, held-batch loss) pairs tried by adaptive γ; γ=0 first (the base model's loss)."""

    @property
    def rank_map(self) -> Dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    @property
    def importance(self) -> Dict[str, float]:
        return {name: layer.importance for name, layer in self.layers.items()}

    def table(self) -> str:
        """A plain-text table: one row per layer, then the budget line and any notes."""
        header = f"{'module':<48} {'out x in':>12} {'importance':>11} {'rank':>5} {'params':>10} {'proj.err':>8}"
        rows = [header, "-" * len(header)]
        for layer in self.layers.values():
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            error = "-" if layer.projection_error is None else f"{layer.projection_error:.3f}"
            rows.append(
                f"{layer.name[-48:]:<48} {shape:>12} {layer.importance:>11.4e} {layer.rank:>5d} "
                f"{layer.params:>10,d} {error:>8}"
            )
        ratio = self.param_count / self.param_budget if self.param_budget else float("nan")
        rows.append("-" * len(header))
        rows.append(
            f"trainable params {self.param_count:,d} vs LoRA at r={self.config.rank_ref}: {self.param_budget:,d}"
            f" ({ratio:.1%}); gradient steps {self.grad_steps}; gamma {self.gamma:.4g}"
        )
        rows.extend(f"note: {note}" for note in self.notes)
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """JSON-ready form (for gora.json)."""
        return {
            "config": self.config.to_dict(),
            "rank_map": self.rank_map,
            "importance": self.importance,
            "layers": {name: asdict(layer) for name, layer in self.layers.items()},
            "grad_steps": self.grad_steps,
            "gamma": self.gamma,
            "rank_budget": self.rank_budget,
            "param_budget": self.param_budget,
            "param_count": self.param_count,
            "notes": list(self.notes),
            "timings": dict(self.timings),
            "accumulator_elements": self.accumulator_elements,
            "intrinsic_dimensions": list(self.intrinsic_dimensions),
            "gamma_search": [list(pair) for pair in self.gamma_search],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "GoRAReport":
        layers = {}
        for name, values in data["layers"].items():
            values = dict(values, shape=tuple(values["shape"]))
            layers[name] = LayerReport(**values)
        return cls(
            config=GoRAConfig.from_dict(data["config"]),
            layers=layers,
            grad_steps=data["grad_steps"],
            gamma=data["gamma"],
            rank_budget=data["rank_budget"],
            param_budget=data["param_budget"],
            param_count=data["param_count"],
            notes=list(data.get("notes", [])),
            timings=dict(data.get("timings", {})),
            accumulator_elements=int(data.get("accumulator_elements", 0)),
            intrinsic_dimensions=list(data.get("intrinsic_dimensions", [])),
            gamma_search=[tuple(pair) for pair in data.get("gamma_search", [])],
        )


@dataclass
class GoRAPlan:
    """Everything needed to put GoRA's initial adapters into a model: the report (rank map,
    importances, config) and A0 (r, in), B0 (out, r) per adapted layer, float32 on the CPU."""

    report: GoRAReport
    lora_a: Dict[str, torch.Tensor]
    lora_b: Dict[str, torch.Tensor]
    saved_state: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Full weights of ``config.modules_to_save`` ({"classifier.weight": ...}), trained in full."""
    initial_a: Dict[str, torch.Tensor] = field(default_factory=dict)
    initial_b: Dict[str, torch.Tensor] = field(default_factory=dict)
    """For initializers that offset the base (LoRA-GA, PiSSA): the A0/B0 the base was offset with,
    W − s·B0·A0, when ``lora_a``/``lora_b`` hold other (trained) weights; empty: they are A0/B0."""

    @property
    def rank_map(self) -> Dict[str, int]:
        return self.report.rank_map

    def initial(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A0, B0) of a layer: what its base offset is made of."""
        if name in self.initial_a:
            return self.initial_a[name], self.initial_b[name]
        return self.lora_a[name], self.lora_b[name]

    def with_trainable(self, tensors: Mapping[str, torch.Tensor]) -> "GoRAPlan":
        """This plan (report, initial factors) holding a model's current trainable tensors instead."""
        current = self.from_trainable(self.report, tensors)
        current.initial_a, current.initial_b = self._initial_factors()
        return current

    def with_adapters(self, adapters: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> "GoRAPlan":
        """As :meth:`with_trainable`, from {module: (A, B)}."""
        current = self.from_adapters(self.report, adapters)
        current.initial_a, current.initial_b = self._initial_factors()
        return current

    def _initial_factors(self):
        names = self.lora_a
        return ({name: self.initial(name)[0] for name in names}, {name: self.initial(name)[1] for name in names})

    @classmethod
    def from_adapters(cls, report: GoRAReport, adapters: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
                      saved_state: Optional[Dict[str, torch.Tensor]] = None) -> "GoRAPlan":
        """The plan ``report`` describes with other adapter weights: {module: (A (r, in), B (out, r))},
        e.g. trained ones, read from a checkpoint or gathered from a sharded model."""
        return cls(report, {name: a for name, (a, _) in adapters.items()}, {name: b for name, (_, b) in adapters.items()},
                   dict(saved_state or {}))

    @classmethod
    def from_trainable(cls, report: GoRAReport, tensors: Mapping[str, torch.Tensor]) -> "GoRAPlan":
        """As :meth:`from_adapters`, from a model's trainable tensors by name: ``<module>.lora_A`` and
        ``<module>.lora_B`` of every adapter, the rest the saved modules' full weights."""
        modules = sorted({name.rsplit(".lora_", 1)[0] for name in tensors if ".lora_" in name})
        adapters = {m: (tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]) for m in modules}
        return cls.from_adapters(report, adapters, {n: v for n, v in tensors.items() if ".lora_" not in n})
