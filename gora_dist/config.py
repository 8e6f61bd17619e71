"""GoRAConfig: every option of the method, checked once when it is built.

Defaults follow the paper's runs (arXiv 2502.12171, Sec. 4): importance avg(|W⊙G|),
budget features √(m+n), r_ref 8 in [4, 32], α 16 with rsLoRA scaling α/√r, γ 5e-2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence, Union

IMPORTANCE_METRICS = ("mean_abs_wg", "grad_nuclear", "wg_nuclear")
RANK_FEATURES = ("sqrt", "identity")
RANK_ROUNDINGS = ("round", "floor", "ceil")
ALLOCATORS = ("gora", "gelora", "uniform")
ID_METHODS = ("mle", "fit")
INITIALIZERS = ("gora", "lora_ga", "lora_one", "pissa")
SVD_MODES = ("randomized", "exact")
OFFSET_INITIALIZERS = ("lora_ga", "pissa")
"""Initialisations that move the base weight (W − s·B0·A0), so the adapter a user ships is converted."""


@dataclass(kw_only=True)
class GoRAConfig:
    """Options of GoRA's gradient estimation, rank allocation and initialisation."""

    target_modules: Union[Sequence[str], str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Modules to adapt. A list matches a module whose name equals an entry or ends with
    ``"." + entry`` (PEFT's rule); a string is a regular expression that must match the whole name."""

    rank_ref: int = 8
    """Reference rank: the budget is what LoRA at this rank would get (paper: 8)."""

    rank_min: int = 4
    """Smallest rank a layer can get. 0 is allowed and means "no adapter on that layer"."""

    rank_max: int = 32
    """Largest rank a layer can get (also capped by min(in, out) of each layer)."""

    alpha: float = 16.0
    """LoRA α. The forward scale is α/√r with ``use_rslora`` (the paper's runs), else α/r."""

    use_rslora: bool = True
    """Scale by α/√r (rsLoRA, as in the paper and the official scripts) instead of α/r."""

    gamma: float = 5e-2
    """Step size γ of the one-step-of-descent initialisation ΔW0 ≈ -γ·√(in/r)·Ḡ·P_A. 0 gives B0 = 0."""

    grad_steps: int = 8
    """N: number of batches whose gradients are averaged (official parser default 8)."""

    importance: str = "mean_abs_wg"
    """Layer score: ``mean_abs_wg`` = avg(|W⊙Ḡ|) (paper), ``grad_nuclear`` = ‖Ḡ‖_*,
    ``wg_nuclear`` = ‖W⊙Ḡ‖_* (the paper's ablation)."""

    rank_features: str = "sqrt"
    """Budget features f(m, n): ``sqrt`` = √(m+n) (paper, Eq. 6-7), ``identity`` = m+n
    (the official scripts; the budget is then LoRA's parameter count at ``rank_ref``)."""

    rank_rounding: str = "round"
    """How b·a_i/f_i becomes an integer: ``round`` (half up), ``floor`` or ``ceil``."""

    fit_budget: bool = False
    """Not in the paper: rescale the ideal ranks so that, after clipping to [rank_min, rank_max] and
    rounding, the adapters' parameter count is as close as it can be to LoRA's at ``rank_ref`` (the
    paper's clip lets the total drift, e.g. 11 % under when a few layers hit rank_max). For
    comparisons at equal budget."""

    seed: int = 0
    """Seeds A0 together with each module's name, so every process draws the same A0."""

    dropout: float = 0.0
    """Dropout on the adapter's input during training (PEFT's ``lora_dropout``)."""

    modules_to_save: Sequence[str] = ()
    """Modules trained in full and saved beside the adapters (a new classification head:
    ``["classifier"]``), matched like a list of ``target_modules``; PEFT's ``modules_to_save``."""

    adaptive_grad_steps: bool = False
    """Stop gradient estimation early once importances settle (official, off by default)."""

    adaptive_min_steps: int = 3
    """With ``adaptive_grad_steps``: never stop before this many steps."""

    adaptive_threshold: float = 0.1
    """With ``adaptive_grad_steps``: stop when every layer's |I_t - I_{t-1}| / I_{t-1} ≤ this."""

    adaptive_gamma: bool = False
    """Pick γ from the grid ``adaptive_gamma_base**k`` by the loss on a held batch (official)."""

    adaptive_gamma_base: float = 0.8
    adaptive_gamma_candidates: int = 52
    """With ``adaptive_gamma``: candidates γ = base**k for k = 0 .. candidates-1."""

    allocator: str = "gora"
    """How ranks are chosen: ``gora`` (importance and budget, the paper), ``gelora`` (the intrinsic
    dimension of each block's hidden states, arXiv 2412.09250) or ``uniform`` (rank_ref everywhere,
    plain LoRA's map). GoRA's B0 init applies to each."""

    gelora_method: str = "mle"
    """With ``gelora``: the TwoNN estimator, ``mle`` or ``fit`` (linear fit, top 10% of μ dropped)."""

    gelora_offset: int = 0
    """With ``gelora``: added to every block's rank max(d_i − d_{i−1}, 0) before clipping."""

    gelora_scale_to_budget: bool = False
    """With ``gelora``: scale the block ranks so the parameter count matches LoRA at ``rank_ref``."""

    initializer: str = "gora"
    """The adapters' A0/B0: ``gora`` (the pseudo-inverse solve, the paper), ``lora_ga`` (arXiv
    2407.05000, as PEFT: Ḡ's singular vectors, base offset), ``lora_one`` (arXiv 2502.01235: −Ḡ's top
    singular vectors, no offset) or ``pissa`` (arXiv 2404.02948: W's principal part, base becomes the
    residual). Any allocator with any initializer; every one from the sharded Ḡ or W
    (method/sharded_svd.py)."""

    svd: str = "randomized"
    """How lora_ga / lora_one / pissa find singular vectors: ``randomized`` (range finder over the
    shards, adapter-sized traffic) or ``exact`` (k = min(out, in): weight-sized traffic; small layers, tests)."""

    svd_oversample: int = 8
    """Randomized SVD: columns carried beyond the triplets needed (Halko et al.'s p)."""

    svd_power_iters: int = 4
    """Randomized SVD: power iterations (PEFT's LoRA-GA and PiSSA examples use 4)."""

    stable_gamma: float = 0.0
    """The γ of lora_ga's and lora_one's "stable" scale; 0: each method's default (16, 128)."""

    metadata: dict = field(default_factory=dict)
    """Free-form user data, written into ``gora.json``."""

    @property
    def needs_gradients(self) -> bool:
        """False when neither the ranks nor A0/B0 read a gradient (PiSSA's SVD of W with uniform ranks):
        the N gradient steps are then skipped, and ``grad_steps`` is not used."""
        return not (self.initializer == "pissa" and self.allocator == "uniform")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("target_modules: an empty pattern matches nothing")
        else:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules: give at least one module name")
        self.modules_to_save = tuple(self.modules_to_save)
        _check_choice("importance", self.importance, IMPORTANCE_METRICS)
        _check_choice("rank_features", self.rank_features, RANK_FEATURES)
        _check_choice("rank_rounding", self.rank_rounding, RANK_ROUNDINGS)
        _check_choice("allocator", self.allocator, ALLOCATORS)
        _check_choice("gelora_method", self.gelora_method, ID_METHODS)
        _check_choice("initializer", self.initializer, INITIALIZERS)
        _check_choice("svd", self.svd, SVD_MODES)
        if self.svd_oversample < 0 or self.svd_power_iters < 0:
            raise ValueError(f"svd_oversample={self.svd_oversample}, svd_power_iters={self.svd_power_iters}: "
                             "must be >= 0")
        if not self.stable_gamma >= 0:
            raise ValueError(f"stable_gamma={self.stable_gamma}: must be >= 0 (0: the method's default)")
        if self.initializer != "gora" and self.adaptive_gamma:
            raise ValueError(f"adaptive_gamma searches GoRA's γ; initializer={self.initializer!r} has none")
        if self.rank_min < 0:
            raise ValueError(f"rank_min={self.rank_min}: must be >= 0")
        if self.rank_max < 1:
            raise ValueError(f"rank_max={self.rank_max}: must be >= 1")
        if self.rank_min > self.rank_max:
            raise ValueError(f"rank_min={self.rank_min} > rank_max={self.rank_max}: need rank_min <= rank_max")
        if not self.rank_min <= self.rank_ref <= self.rank_max or self.rank_ref < 1:
            raise ValueError(
                f"rank_ref={self.rank_ref} is outside [rank_min, rank_max] = [{self.rank_min}, {self.rank_max}]"
                " (and must be >= 1)"
            )
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha}: must be > 0")
        if not self.gamma >= 0:  # also rejects NaN
            raise ValueError(f"gamma={self.gamma}: must be >= 0 (0 means B0 = 0, no gradient initialisation)")
        if self.grad_steps < 1:
            raise ValueError(f"grad_steps={self.grad_steps}: need at least one gradient step")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: must be in [0, 1)")
        if self.adaptive_min_steps < 1:
            raise ValueError(f"adaptive_min_steps={self.adaptive_min_steps}: must be >= 1")
        if not self.adaptive_threshold >= 0:
            raise ValueError(f"adaptive_threshold={self.adaptive_threshold}: must be >= 0")
        if not 0.0 < self.adaptive_gamma_base < 1.0:
            raise ValueError(f"adaptive_gamma_base={self.adaptive_gamma_base}: must be in (0, 1)")
        if self.adaptive_gamma_candidates < 1:
            raise ValueError(f"adaptive_gamma_candidates={self.adaptive_gamma_candidates}: must be >= 1")

    def to_dict(self) -> dict:
        """JSON-ready copy (tuples become lists)."""
        out = dataclasses.asdict(self)
        if not isinstance(self.target_modules, str):
            out["target_modules"] = list(self.target_modules)
        out["modules_to_save"] = list(self.modules_to_save)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "GoRAConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GoRAConfig option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**values)


def _check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not one of {list(choices)}")


def gamma_candidates(config: GoRAConfig) -> list:
    """The adaptive-γ grid, largest first: base**0, base**1, ... (official code: 0.8**k, k < 52)."""
    return [config.adaptive_gamma_base**k for k in range(config.adaptive_gamma_candidates)]

