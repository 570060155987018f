"""The adapter methods peftkit knows, each declared once with what it can do.

    method("houlsby").tuner.inject(model, config, name)
    method("lora").mergeable  -> True

attach, save/load, merge, the bank, `bench params` and the CLI read this table; no
other module names a method. A new method is one tuner folder (see peftkit.tuners
for its contract) plus one entry here. Importing this module imports no torch.
"""
import importlib
from dataclasses import dataclass

from .errors import PeftkitError


@dataclass(frozen=True)
class Method:
    name: str
    long_name: str  # for messages: "prefix tuning does not work with ..."
    tuner_module: str  # peftkit.tuners.<...>: Config, inject, adapter_state_dict, ... (peftkit.tuners)
    peft_native: bool  # peft builds it (a PeftModel) and saves it in peft's file layout, which stock peft
    # loads; otherwise its tuner injects it and save_adapter writes peftkit's layout (one record, one safetensors)
    mergeable: bool  # a weight update that merge() folds into the base
    quantized_base: bool  # trains and serves on a 4/8-bit bitsandbytes base
    gradient_checkpointing: bool  # trains with checkpointed layers
    bank_rows: bool  # the bank serves it, mixed with other adapters per row of one batch; else it refuses it
    why_not_mergeable: str = ""  # merge()'s refusal, for methods that are not a weight update
    why_no_checkpointing: str = ""  # attach()'s refusal, for methods that cannot train with it
    peft_type: str = ""  # peft's name for it (PeftType), for peft-native methods: how a plain peft folder says so
    rank_schedule: bool = False  # reallocates its ranks as it trains (AdaLoRA): peft's update_and_allocate runs
    # after each optimizer step, on a budget schedule over total_step optimizer steps
    prepends_tokens: bool = False  # prompt learning: every input grows by num_virtual_tokens positions, which
    # must fit the model's position limit (the tuner's check_room)
    why_no_resume: str = ""  # `peftkit train --resume`'s refusal, for methods whose checkpoints cannot go on training
    parts: tuple[str, ...] = ()  # a composite (MAM), or a fusion, that lives in these tuners' per-model state
    # under its adapter name: those tuners switch it, together with their own methods' adapters (see switches)

    @property
    def tuner(self):
        return importlib.import_module(self.tuner_module)

    @property
    def switches(self) -> tuple[str, ...]:
        """The tuner modules whose set_active turns this method's adapters on and off."""
        return self.parts or (self.tuner_module,)

    def check_options(self, options: dict) -> None:
        """Refuse options the method does not have, without a model."""
        self.tuner.check_options(self.name, options)

    def for_run(self, options: dict, steps: int) -> dict:
        """`options` for a training run of `steps` optimizer steps: a rank schedule left without its
        length (total_step) gets the run's."""
        if self.rank_schedule and options.get("total_step") is None:
            return {**options, "total_step": steps}
        return options

    def check_input_length(self, options: dict, model, length: int, length_name: str) -> None:
        """Refuse inputs of `length` tokens (as the option `length_name` allows) that the method would
        push past the model's position limit."""
        if self.prepends_tokens:
            self.tuner.check_room(self.name, options, model, length, length_name)

    def config(self, options: dict, model, heads: list[str]):
        """The tuner's config for `model` (whose task heads stay trainable)."""
        return self.tuner.build_config(self.name, options, model, heads)

    def recorded(self, options: dict, config) -> dict:
        """The options an adapter's record keeps, from which load_adapter rebuilds it: those given, or what
        a tuner whose options name other adapters resolved them to (fusion: each fused adapter's own)."""
        resolve = getattr(self.tuner, "recorded_options", None)
        return options if resolve is None else resolve(config)


_ADDS_COMPUTATION = "it adds computation of its own rather than a weight update (use load_adapter for inference)"
_PROMPT = "it prepends learned embeddings to every input, which no base weight can hold (use load_adapter)"
_PREFIX_IN_CACHE = "the prefix travels in the KV cache, which checkpointed layers drop"
_BOTTLENECK = dict(tuner_module="peftkit.tuners.bottleneck", peft_native=False, mergeable=False,
                   quantized_base=True, gradient_checkpointing=True, bank_rows=True,
                   why_not_mergeable="a bottleneck adapter is a small network between layers: " + _ADDS_COMPUTATION)

METHODS = {m.name: m for m in (
    Method("lora", "LoRA", "peftkit.tuners.lora", peft_native=True, mergeable=True, quantized_base=True,
           gradient_checkpointing=True, bank_rows=True, peft_type="LORA"),  # Hu et al. 2021
    Method("houlsby", "the Houlsby adapter", **_BOTTLENECK),  # Houlsby et al. 2019
    Method("pfeiffer", "the Pfeiffer adapter", **_BOTTLENECK),  # Pfeiffer et al. 2020
    Method("parallel", "the parallel adapter", **_BOTTLENECK),  # He et al. 2022
    Method("compacter", "Compacter", **_BOTTLENECK),  # Karimi Mahabadi et al. 2021
    # peft's other layer methods: peft builds, saves and merges them; the bank's per-row hooks read LoRA only
    Method("ia3", "IA3", "peftkit.tuners.peft_layers", peft_native=True, mergeable=True, quantized_base=True,
           gradient_checkpointing=True, bank_rows=False, peft_type="IA3"),  # Liu et al. 2022
    Method("loha", "LoHa", "peftkit.tuners.peft_layers", peft_native=True, mergeable=True, quantized_base=False,
           gradient_checkpointing=True, bank_rows=False, peft_type="LOHA"),  # Hyeon-Woo et al. 2022
    Method("lokr", "LoKr", "peftkit.tuners.peft_layers", peft_native=True, mergeable=True, quantized_base=False,
           gradient_checkpointing=True, bank_rows=False, peft_type="LOKR"),  # Yeh et al. 2023
    Method("vera", "VeRA", "peftkit.tuners.peft_layers", peft_native=True, mergeable=True, quantized_base=True,
           gradient_checkpointing=True, bank_rows=False, peft_type="VERA"),  # Kopiczko et al. 2024
    Method("oft", "OFT", "peftkit.tuners.peft_layers", peft_native=True, mergeable=True, quantized_base=True,
           gradient_checkpointing=True, bank_rows=False, peft_type="OFT"),  # Qiu et al. 2023
    Method("boft", "BOFT", "peftkit.tuners.peft_layers", peft_native=True, mergeable=True, quantized_base=True,
           gradient_checkpointing=True, bank_rows=False, peft_type="BOFT"),  # Liu et al. 2024
    Method("fourierft", "FourierFT", "peftkit.tuners.peft_layers", peft_native=True, mergeable=True,
           quantized_base=True, gradient_checkpointing=True, bank_rows=False, peft_type="FOURIERFT"),  # Gao et al. 2024
    Method("ln_tuning", "LN tuning", "peftkit.tuners.peft_layers", peft_native=True, mergeable=True,
           quantized_base=True, gradient_checkpointing=True, bank_rows=False, peft_type="LN_TUNING"),  # Qi et al. 2022
    Method("adalora", "AdaLoRA", "peftkit.tuners.peft_layers", peft_native=True, mergeable=True, quantized_base=True,
           gradient_checkpointing=True, bank_rows=False, peft_type="ADALORA", rank_schedule=True,
           why_no_resume="reallocates ranks by importance scores it gathers while training, which a checkpoint "
                         "does not hold (its weights are saved cut to the ranks kept), so the run cannot go on "
                         "where it stopped"),  # Zhang et al. 2023
    # peft's prompt learning: learned embeddings prepended to the input, on causal LMs and encoder classifiers
    Method("prompt_tuning", "prompt tuning", "peftkit.tuners.prompt", peft_native=True, mergeable=False,
           quantized_base=True, gradient_checkpointing=True, bank_rows=False, peft_type="PROMPT_TUNING",
           prepends_tokens=True, why_not_mergeable=_PROMPT),  # Lester et al. 2021
    Method("p_tuning", "p-tuning", "peftkit.tuners.prompt", peft_native=True, mergeable=False, quantized_base=True,
           gradient_checkpointing=True, bank_rows=False, peft_type="P_TUNING", prepends_tokens=True,
           why_not_mergeable=_PROMPT,  # Liu et al. 2021
           why_no_resume="saves the prompt its encoder made, not the encoder, so the run cannot go on training it"),
    # attention over bottleneck adapters' outputs, built over adapters the model holds or adapter folders;
    # it lives in the bottleneck tuner's state, whose set_active runs a fusion by its name
    Method("fusion", "AdapterFusion", "peftkit.tuners.bottleneck.fusion", peft_native=False, mergeable=False,
           quantized_base=True, gradient_checkpointing=True, bank_rows=True,  # Pfeiffer et al. 2021
           parts=("peftkit.tuners.bottleneck",),
           why_not_mergeable="AdapterFusion attends over its adapters' outputs at every site: " + _ADDS_COMPUTATION),
    Method("prefix", "prefix tuning", "peftkit.tuners.prefix", peft_native=False, mergeable=False, quantized_base=True,
           gradient_checkpointing=False, bank_rows=True,  # Li & Liang 2021
           why_not_mergeable="prefix tuning adds key/value slots to attention: " + _ADDS_COMPUTATION,
           why_no_checkpointing=_PREFIX_IN_CACHE),
    # AdapterHub's composites of peftkit's own parts; their prefix keeps them from checkpointing too
    Method("mam", "the MAM adapter", "peftkit.tuners.mam", peft_native=False, mergeable=False, quantized_base=True,
           gradient_checkpointing=False, bank_rows=True,  # He et al. 2022
           parts=("peftkit.tuners.prefix", "peftkit.tuners.bottleneck"),
           why_not_mergeable="a MAM adapter is a prefix plus a parallel adapter: " + _ADDS_COMPUTATION,
           why_no_checkpointing=_PREFIX_IN_CACHE),
    # its prefix gate is one number per sample from all of its tokens: no per-row mixing, no chunked prefill
    Method("unipelt", "UniPELT", "peftkit.tuners.unipelt", peft_native=False, mergeable=False, quantized_base=True,
           gradient_checkpointing=False, bank_rows=False,  # Mao et al. 2022
           why_not_mergeable="UniPELT gates its LoRA by the input and adds a prefix and an adapter: "
                             + _ADDS_COMPUTATION,
           why_no_checkpointing=_PREFIX_IN_CACHE),
)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise PeftkitError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]


def tuner_groups(names) -> dict:
    """{tuner module: [method names]} for `names`: methods sharing a tuner's state are switched together,
    a composite in each of its parts' groups (so one set_active per module covers every row)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        for module in method(name).switches:
            groups.setdefault(module, []).append(name)
    return groups


def activate(model, name: str, held: dict) -> None:
    """Make own adapter `name` the only active one among the model's own adapters (`held`: {adapter name:
    method}, `name` included): every switch they use goes off first, so no other adapter, and no part
    of a composite one, stays on beside it."""
    for module in sorted({s for m in held.values() if not method(m).peft_native for s in method(m).switches}):
        importlib.import_module(module).set_active(model, None)
    method(held[name]).tuner.set_active(model, name)
