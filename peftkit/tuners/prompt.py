"""peft's prompt-learning methods, prompt tuning (PromptTuningConfig) and p-tuning (PromptEncoderConfig),
as tuners.peft_layers does peft's layer methods: peft builds, saves and loads them; this module turns
peftkit options into their configs and refuses, in one line, what peft's prompt learning gets wrong.

    attach(model, {"method": "prompt_tuning", "num_virtual_tokens": 20})
    attach(model, {"method": "p_tuning", "encoder_hidden_size": 128})

peft prepends num_virtual_tokens learned embeddings to every input. That works for causal LMs and
for encoder sequence classifiers (their pooler reads the first position, now a learned one). It
does not for the other task models, which peft hands the longer sequence unchanged: span (QA) and
token labels still count from the first real token, and a decoder classifier given embeddings
reads its label at the last position, a pad token in every right-padded row.
"""
from peft import PromptEncoderConfig, PromptTuningConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ..anatomy import model_task
from ..errors import PeftkitError
from .lora import task_type
from .options import config_options, refuse_unknown_options

CONFIGS = {"prompt_tuning": PromptTuningConfig, "p_tuning": PromptEncoderConfig}
# peft reads these from the model's config; another value would build prompts the model cannot take
_FROM_THE_MODEL = ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers")
VIRTUAL_TOKENS = 20  # where the options give none (peft has no default)
WORKS_ON = "causal LMs (generation) and encoder sequence classifiers (BERT, RoBERTa)"


def options_of(method: str) -> list[str]:
    return config_options(CONFIGS[method], _FROM_THE_MODEL)


def check_options(method: str, options: dict) -> None:
    """Every option is the config's (an unknown one is named with the nearest valid ones); the
    number of virtual tokens is usable."""
    refuse_unknown_options(method, options, options_of(method), CONFIGS[method].__name__)
    tokens = options.get("num_virtual_tokens", VIRTUAL_TOKENS)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise PeftkitError(f"{method} num_virtual_tokens must be a positive integer, got {tokens!r}")


def build_config(method: str, options: dict, model, heads: list[str]):
    check_options(method, options)
    check_task(method, model)
    check_room(method, options, model)
    options = {"num_virtual_tokens": VIRTUAL_TOKENS, **options}
    options["modules_to_save"] = sorted(set(options.get("modules_to_save") or []) | set(heads)) or None
    try:
        return CONFIGS[method](task_type=task_type(model), **options)
    except (ValueError, TypeError) as err:
        raise PeftkitError(f"invalid {method} options: {err}") from None


# Why each task model but a causal LM and an encoder classifier is refused
_WHY_NOT = {"base": "peft adds the prompt only in a task model's forward, so a bare body would never see it",
            "qa": "peft prepends the prompt to the start/end logits but not to the answer positions",
            "token-classification": "peft prepends the prompt to the logits but not to the token labels",
            "classification": "given embeddings (as peft passes them), a decoder classifier reads its label at the "
                              "last position, a pad token in every right-padded row"}


def check_task(method: str, model) -> None:
    """Refuse the task models peft's prepended prompt misleads (see the module docstring)."""
    name = type(model).__name__
    task = (model_task(name) or ("base",))[0]
    encoder = getattr(model.config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if task == "causal-lm" or (task == "classification" and encoder):
        return
    raise PeftkitError(f"{method} does not work on a {name}: {_WHY_NOT[task]}; it works on {WORKS_ON}")


def check_room(method: str, options: dict, model, length: int = 1, length_name: str | None = None) -> None:
    """Refuse inputs of `length` tokens (the option `length_name` sets it; None: the shortest input) that
    the virtual tokens would push past the model's position limit (config.max_position_embeddings)."""
    tokens = options.get("num_virtual_tokens", VIRTUAL_TOKENS)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or tokens + length <= limit:
        return
    ways = [f"num_virtual_tokens <= {limit - length}"] if limit > length else []
    ways += [f"{length_name} <= {limit - tokens}"] if length_name and limit > tokens else []
    what = f"{length_name} {length}" if length_name else "one input token"
    raise PeftkitError(f"{method}: {tokens} virtual tokens and {what} need {tokens + length} positions, more than "
                       f"the {limit} of {type(model).__name__} (max_position_embeddings); use {' or '.join(ways)}")


def describe(model) -> str:
    """The prompt's length (and p-tuning's encoder), for `bench params`."""
    config = next(iter(model.peft_config.values()))
    if not isinstance(config, PromptEncoderConfig):
        return f"{config.num_virtual_tokens} virtual tokens"
    kind = getattr(config.encoder_reparameterization_type, "value", config.encoder_reparameterization_type)
    return f"{config.num_virtual_tokens} virtual tokens, {kind} encoder of {config.encoder_hidden_size}"
