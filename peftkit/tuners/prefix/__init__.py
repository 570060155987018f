"""Prefix tuning (Li & Liang 2021) for encoders and decoders under transformers 5.

Trainable key/value slots are prepended to every attention layer (see layer.py for how).
The parameterization, including the optional reparameterization MLP, is peft's
PrefixEncoder, so parameters and state-dict keys line up with peft's.
"""
from .config import Config, build_config, check_options
from .model import SUPPORTED, adapter_state_dict, describe, inject, load_adapter_state_dict, remove, set_active

__all__ = ["Config", "SUPPORTED", "check_options", "build_config", "inject", "adapter_state_dict",
           "load_adapter_state_dict", "set_active", "remove", "describe"]
