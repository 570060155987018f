"""Options of the bottleneck adapters (Houlsby, Pfeiffer, parallel, Compacter).

    Config.from_options({"method": "pfeiffer", "reduction_factor": 8})
    config.to_options()            -> JSON-serializable dict, round-trips
    config.bottleneck_dim(hidden)  -> the bottleneck width for a model
    config.check_sizes(hidden)     -> PeftkitError if the sizes don't fit the model
"""
import re
from dataclasses import dataclass

from ...errors import PeftkitError
from ...methods import METHODS as REGISTRY
from ..options import field_names, refuse_unknown_options

METHODS = tuple(name for name, m in REGISTRY.items() if m.tuner_module == "peftkit.tuners.bottleneck")
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
DEFAULT_REDUCTION_FACTOR = 16
DEFAULT_SCALING = 4.0  # He et al. 2022 scale the parallel adapter's output by 4
# Compacter's own defaults (Karimi Mahabadi et al. 2021, as AdapterHub's CompacterConfig sets them)
COMPACTER_REDUCTION_FACTOR = 32
COMPACTER_NON_LINEARITY = "gelu"
PLACEMENTS = ("houlsby", "pfeiffer")  # Compacter after attention and feed-forward, or Compacter++: feed-forward only
COMPACTER_ONLY = ("phm_dim", "phm_rank", "placement")


@dataclass
class Config:
    method: str = "houlsby"
    # At most one of the two; with neither, reduction_factor 16 applies. Kept as None
    # rather than defaulting reduction_factor so that "both given" stays detectable.
    bottleneck_size: int | None = None
    reduction_factor: int | None = None
    non_linearity: str | None = None  # None: the method's default (relu; gelu for compacter)
    scaling: float = DEFAULT_SCALING  # parallel only
    dropout: float = 0.0
    target_modules: list[str] | None = None  # houlsby/pfeiffer/compacter: modules after whose output an adapter goes
    phm_dim: int = 4  # compacter only: n, the number of n x n rule matrices and of blocks per side
    phm_rank: int = 1  # compacter only: rank of each per-layer factor B_i = s_i t_i^T
    placement: str | None = None  # compacter only: houlsby (None) or pfeiffer (Compacter++)

    def __post_init__(self):
        self._validate()

    @classmethod
    def from_options(cls, options: dict, hidden_size: int | None = None) -> "Config":
        refuse_unknown_options("bottleneck", options, field_names(cls))
        method = options.get("method", "houlsby")
        # Silently ignoring these would train something other than what was asked for.
        if "scaling" in options and method != "parallel":
            raise PeftkitError(f"option 'scaling' only applies to method 'parallel', not {method!r}")
        if options.get("target_modules") is not None and method == "parallel":
            raise PeftkitError(
                "option 'target_modules' only applies to methods 'houlsby', 'pfeiffer' and 'compacter'; "
                "the parallel adapter always sits beside the feed-forward block"
            )
        others = [key for key in COMPACTER_ONLY if key in options and method != "compacter"]
        if others:
            raise PeftkitError(f"option {others[0]!r} only applies to method 'compacter', not {method!r}")
        if options.get("placement") is not None and options.get("target_modules") is not None:
            raise PeftkitError("give either placement or target_modules, not both; "
                               "target_modules already says where every adapter goes")
        config = cls(**options)
        if hidden_size is not None:
            config.check_sizes(hidden_size)
        return config

    def to_options(self) -> dict:
        options = {
            "method": self.method,
            "bottleneck_size": self.bottleneck_size,
            "reduction_factor": self.reduction_factor,
            "non_linearity": self.non_linearity,
            "dropout": self.dropout,
        }
        if self.method == "parallel":
            options["scaling"] = self.scaling
        else:
            options["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        if self.method == "compacter":
            options.update(phm_dim=self.phm_dim, phm_rank=self.phm_rank, placement=self.placement)
        return options

    @property
    def after_attention(self) -> bool:
        """Whether the default placement has an adapter after attention too (Houlsby's)."""
        return self.method == "houlsby" or self.method == "compacter" and self.placement in (None, "houlsby")

    @property
    def default_reduction_factor(self) -> int:
        return COMPACTER_REDUCTION_FACTOR if self.method == "compacter" else DEFAULT_REDUCTION_FACTOR

    def bottleneck_dim(self, hidden_size: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        size = hidden_size // (self.reduction_factor or self.default_reduction_factor)
        if self.method == "compacter":  # PHM layers need a multiple of phm_dim: round down, to at least phm_dim
            return max(self.phm_dim, size - size % self.phm_dim)
        return size

    def check_sizes(self, hidden_size: int) -> None:
        """Size checks that need the model; inject calls this before touching it."""
        rf = self.reduction_factor
        if rf is not None and rf > hidden_size:
            raise PeftkitError(
                f"reduction_factor {rf} is larger than the model's hidden size {hidden_size}; "
                f"valid range is 1..{hidden_size}"
            )
        if self.bottleneck_dim(hidden_size) < 1:  # only reachable via the default factor on a tiny model
            raise PeftkitError(
                f"hidden size {hidden_size} is too small for the default reduction_factor "
                f"{self.default_reduction_factor}; set reduction_factor (1..{hidden_size}) or bottleneck_size"
            )

    def _validate(self):
        if self.method not in METHODS:
            raise PeftkitError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise PeftkitError(
                "give either bottleneck_size or reduction_factor, not both "
                f"(got bottleneck_size={self.bottleneck_size}, reduction_factor={self.reduction_factor})"
            )
        for key in ("bottleneck_size", "reduction_factor"):
            value = getattr(self, key)
            if value is None:
                continue
            if not _is_int(value):
                raise PeftkitError(f"{key} must be an integer >= 1, got {value!r} ({type(value).__name__})")
            if value < 1:
                raise PeftkitError(f"{key} must be >= 1, got {value}")
        if self.non_linearity is None:
            self.non_linearity = COMPACTER_NON_LINEARITY if self.method == "compacter" else "relu"
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in NON_LINEARITIES:
            raise PeftkitError(
                f"non_linearity {self.non_linearity!r} is not one of {', '.join(NON_LINEARITIES)}"
            )
        self.non_linearity = self.non_linearity.lower()
        if not _is_number(self.scaling):
            raise PeftkitError(f"scaling must be a number, got {self.scaling!r} ({type(self.scaling).__name__})")
        self.scaling = float(self.scaling)
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise PeftkitError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        tm = self.target_modules
        if tm is not None:
            if isinstance(tm, str):  # one pattern is a common, harmless shorthand
                tm = [tm]
            if not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(t, str) and t for t in tm):
                raise PeftkitError(
                    f"target_modules must be a non-empty list of module names or regexes, got {self.target_modules!r}"
                )
            for pattern in tm:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise PeftkitError(f"target_modules entry {pattern!r} is not a valid regex: {e}") from None
            self.target_modules = list(tm)
        if self.method == "compacter":
            self._validate_phm()

    def _validate_phm(self):
        for key in ("phm_dim", "phm_rank"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise PeftkitError(f"{key} must be an integer >= 1, got {value!r}")
        if self.placement not in (None,) + PLACEMENTS:
            raise PeftkitError(f"placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.bottleneck_size is not None and self.bottleneck_size % self.phm_dim:
            raise PeftkitError(f"bottleneck_size {self.bottleneck_size} is not a multiple of phm_dim {self.phm_dim}; "
                               f"the PHM layers split it into phm_dim blocks")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_options(method: str, options: dict) -> None:
    Config.from_options({"method": method, **options})


def build_config(method: str, options: dict, model=None, heads=()) -> Config:
    """The adapter's config, checked against `model` when given: attach refuses one that does not fit
    before it freezes anything."""
    config = Config.from_options({"method": method, **options})
    if model is not None:
        from .model import fitted  # model.py imports this module
        fitted(model, config)
    return config
