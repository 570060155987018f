"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning"): gated prefix tuning, a gated bottleneck adapter and gated LoRA in one adapter.

Each part is multiplied by a learned gate in (0, 1), so training can turn a part down where it
does not help. The prefix and the adapter live in the prefix and bottleneck tuners (under the
UniPELT adapter's name); the gated LoRA and the prefix gates are this package's own (layer.py).
See peftkit.tuners for the contract.
"""
from .config import Config, build_config, check_options
from .model import adapter_state_dict, describe, inject, load_adapter_state_dict, remove, set_active

__all__ = ["Config", "check_options", "build_config", "inject", "adapter_state_dict", "load_adapter_state_dict",
           "set_active", "remove", "describe"]
