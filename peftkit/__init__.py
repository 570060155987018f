"""peftkit: parameter-efficient fine-tuning for one GPU or a laptop.

    model = peftkit.attach(model, "lora")          # or "houlsby", "pfeiffer", "parallel", "prefix", a YAML, a dict
    peftkit.param_report(model)
    peftkit.save_adapter(model, "out/dir")
    model = peftkit.load_adapter(base_model, "out/dir")
    merged = peftkit.merge(model)
    bank = peftkit.AdapterBank("smollm2-135m")     # one base, many adapters, one per batch row
"""
__version__ = "0.1.0"

from .attach import attach
from .bank import AdapterBank
from .errors import PeftkitError
from .loading import load_model, load_tokenizer
from .merge import merge
from .report import param_report
from .saving import load_adapter, save_adapter

__all__ = ["attach", "param_report", "save_adapter", "load_adapter", "merge", "load_model", "load_tokenizer",
           "PeftkitError", "AdapterBank"]
