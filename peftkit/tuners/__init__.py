"""Adapter methods, one module or package each, shaped like peft's tuners.

Each method is declared in peftkit.methods, which names its tuner module. Every
tuner checks and builds its method's config:

    check_options(method, options)                      PeftkitError naming a bad option
    build_config(method, options, model, heads)         the config attach injects
    describe(model)                                     one line on what was attached (bench params)

LoRA, peft's other layer methods (IA3, LoHa, LoKr, VeRA, OFT, BOFT, FourierFT, LN tuning,
AdaLoRA) and its prompt learning (prompt tuning, p-tuning) are peft's own (peftkit.tuners.lora,
peftkit.tuners.peft_layers and peftkit.tuners.prompt only translate options into their configs).
A method that prepends tokens to every input (Method.prepends_tokens) also has

    check_room(method, options, model, length, length_name)   PeftkitError past the position limit
The methods peft lacks here (bottleneck adapters; prefix tuning that works for
encoders and task heads under transformers 5; MAM and UniPELT, whose parts those
tuners hold under the composite's adapter name, see composite.py) live in their own
modules or packages with config.py / layer.py / model.py and also expose:

    Config                       dataclass; Config.from_options(dict) validates and
                                 raises PeftkitError naming the bad option
    inject(model, config, name)  add adapter `name` to a frozen transformers model
    adapter_state_dict(model, name) -> {key: tensor}   keys do not contain `name`
    load_adapter_state_dict(model, name, state_dict)   strict; PeftkitError on mismatch
    set_active(model, name | None)                     None = base model alone
    remove(model, name)
"""
