"""The injection: prefix keys/values reach attention through the model's own KV cache.

A forward pre-hook on the model body (model.base_model: BertModel, LlamaModel, GPT2Model)
hands it a DynamicCache that already holds the P prefix key/value slots of every layer and
prepends P ones to the 2D attention mask. Each attention layer then attends to
[prefix; tokens] through its ordinary `cache.update` path, so task heads (classification,
QA, LM) and `generate` need nothing special, and transformers builds the right 4D mask for
whichever attention implementation the model runs. Token positions move up by P, as if the
prefix were P earlier tokens: that is what peft does (and did for BERT under transformers 4),
so a prefix trained with peft gives the same outputs here.

Mixed batches give every row its own prefix: prefixes are zero-padded to the longest one,
the padding slots are masked out, and each row's positions move by its own prefix length.
"""
import inspect
from dataclasses import dataclass

import torch
from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning.model import PrefixEncoder
from torch import nn
from transformers import DynamicCache

from peftkit.errors import PeftkitError

from .config import Config


@dataclass(frozen=True)
class Geometry:
    """Shape of one layer's keys: what a prefix must provide per layer."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None = None  # learned absolute positions (BERT, GPT-2): prefix + tokens must fit

    @property
    def token_dim(self) -> int:  # width of one layer's keys; peft's `token_dim` (GQA-aware)
        return self.num_kv_heads * self.head_dim


@dataclass
class Prefix:
    """The prefix of one batch, ready to go into a cache."""
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each (batch, kv_heads, P, head_dim)
    mask: torch.Tensor  # (batch, P): 1 where a row has a prefix slot, 0 for padding slots
    shift: torch.Tensor  # (batch,): each row's own prefix length, by which its positions move


class PrefixBank(nn.Module):
    """All prefix adapters of one model and the current selection.

    A submodule of the model, so the prefix parameters show up in model.parameters()
    and follow model.to(...).
    """

    def __init__(self, geometry: Geometry):
        super().__init__()
        self.geometry = geometry
        self.encoders = nn.ModuleDict()
        self.configs: dict[str, Config] = {}
        self.active: str | list[str | None] | None = None
        self.hook = None  # handle of the pre-hook on the model body

    def add(self, name: str, config: Config, device: torch.device) -> None:
        g = self.geometry
        # peft's own config object, so peft's PrefixEncoder sizes itself exactly as under peft
        peft_config = PrefixTuningConfig(
            num_virtual_tokens=config.num_virtual_tokens,
            token_dim=g.token_dim,
            num_layers=g.num_layers,
            num_attention_heads=g.num_kv_heads,
            encoder_hidden_size=config.encoder_hidden_size or g.token_dim,
            prefix_projection=config.prefix_projection,
            inference_mode=False,  # keep the MLP; it is what gets trained and saved
        )
        self.encoders[name] = PrefixEncoder(peft_config).to(device=device, dtype=torch.float32)
        self.configs[name] = config

    def rows(self, batch_size: int) -> list[str | None] | None:
        """The adapter of each batch row, or None when no row has one."""
        if self.active is None:
            return None
        if isinstance(self.active, str):
            return [self.active] * batch_size
        if len(self.active) != batch_size:
            raise PeftkitError(
                f"prefix: {len(self.active)} per-row adapters are active but the batch has {batch_size} rows"
            )
        return None if all(name is None for name in self.active) else list(self.active)

    def prefix(self, rows: list[str | None], dtype: torch.dtype, device: torch.device) -> Prefix:
        flat = {name: self._flat(name) for name in set(rows) if name is not None}
        longest = max(len(p) for p in flat.values())
        width = 2 * self.geometry.token_dim * self.geometry.num_layers
        blank = next(iter(flat.values())).new_zeros(longest, width)
        per_row = [blank if n is None else nn.functional.pad(flat[n], (0, 0, 0, longest - len(flat[n])))
                   for n in rows]
        lengths = [0 if n is None else len(flat[n]) for n in rows]
        mask = torch.tensor([[1] * p + [0] * (longest - p) for p in lengths], device=device)
        shift = torch.tensor(lengths, device=device)
        return Prefix(self._split(torch.stack(per_row).to(device, dtype)), mask, shift)

    def _check_room(self, needed: int) -> None:
        # an index error deep in an embedding otherwise: positions move up by the prefix length
        limit = self.geometry.max_positions
        if limit is not None and needed > limit:
            raise PeftkitError(
                f"prefix: prefix plus tokens need {needed} positions but the model has {limit}; "
                "shorten the input or use fewer num_virtual_tokens"
            )

    def _flat(self, name: str) -> torch.Tensor:
        """(P, num_layers * 2 * token_dim): peft's layout, for layer l keys then values."""
        encoder = self.encoders[name]
        tokens = torch.arange(self.configs[name].num_virtual_tokens, device=encoder.embedding.weight.device)
        return encoder(tokens[None])[0]

    def _split(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # the same view/permute as peft's get_prompt, so parameter layouts agree
        g = self.geometry
        batch, length = flat.shape[:2]
        kv = flat.view(batch, length, 2 * g.num_layers, g.num_kv_heads, g.head_dim).permute(2, 0, 3, 1, 4)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(g.num_layers)]

    # ---- the forward pre-hook ----

    def before_forward(self, body: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook on the model body: add the prefix to the cache, mask and positions."""
        if self.active is None:  # base model alone: leave the call untouched
            return None
        kwargs = _as_kwargs(body, args, kwargs)
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        rows = self.rows(tokens.shape[0])
        if rows is None:  # every row without a prefix: same as the base model
            return None
        _refuse_checkpointing(body)
        cache_key = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
        cache = kwargs.get(cache_key)
        if cache is not None and hasattr(cache, "peftkit_prefix"):
            prefix = cache.peftkit_prefix  # a later generate step: the cache already holds it
        elif cache is None or cache.get_seq_length() == 0:
            prefix = self.prefix(rows, _hidden_dtype(body, kwargs), tokens.device)
            kwargs[cache_key] = cache = _filled(cache, prefix, body.config)
        else:
            raise PeftkitError(
                "prefix: got a non-empty cache that was not started with a prefix adapter active; "
                "pass no cache (or an empty one) so the prefix can be put in first"
            )
        length = tokens.shape[1]
        past = cache.get_seq_length() - prefix.mask.shape[1]  # real tokens already in the cache
        self._check_room(prefix.mask.shape[1] + past + length)
        kwargs["attention_mask"] = _with_prefix_mask(kwargs.get("attention_mask"), prefix.mask, past + length)
        positions = _positions(body, kwargs, prefix.shift, past, length)
        if positions is not None:
            kwargs["position_ids"] = positions
        return (), kwargs


def _as_kwargs(body: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Name the positional arguments (GPT2Model takes `cache` second), so all are kwargs."""
    if not args:
        return dict(kwargs)
    params = [p.name for p in inspect.signature(body.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(params, args)), **kwargs}


def _refuse_checkpointing(body: nn.Module) -> None:
    # transformers drops the cache inside checkpointed layers, which would drop the prefix
    if body.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) for m in body.modules()
    ):
        raise PeftkitError(
            "prefix tuning does not work with gradient checkpointing (the prefix travels in the KV cache, "
            "which checkpointed layers drop); call model.gradient_checkpointing_disable()"
        )


def _hidden_dtype(body: nn.Module, kwargs: dict) -> torch.dtype:
    """The dtype keys/values will have: that of the hidden states (also under 4/8-bit weights)."""
    embeds = kwargs.get("inputs_embeds")
    return embeds.dtype if embeds is not None else body.get_input_embeddings().weight.dtype


def _filled(cache, prefix: Prefix, config):
    cache = cache if cache is not None else DynamicCache(config=config)
    if not isinstance(cache, DynamicCache):
        raise PeftkitError(f"prefix: only DynamicCache can carry a prefix, got {type(cache).__name__}")
    for layer_idx, (keys, values) in enumerate(prefix.kv):
        cache.update(keys, values, layer_idx)
    cache.peftkit_prefix = prefix  # later generate steps find the mask and shifts here
    return cache


def _with_prefix_mask(mask: torch.Tensor | None, prefix_mask: torch.Tensor, length: int) -> torch.Tensor:
    if mask is None:
        mask = torch.ones(prefix_mask.shape[0], length, dtype=prefix_mask.dtype, device=prefix_mask.device)
    if mask.dim() != 2:
        raise PeftkitError(f"prefix: needs a 2D attention mask (batch, length), got shape {tuple(mask.shape)}")
    return torch.cat([prefix_mask.to(mask.device, mask.dtype), mask], dim=1)


def _positions(body, kwargs, shift, past: int, length: int) -> torch.Tensor | None:
    """Position ids moved up by each row's prefix length; None = the model's own default does it."""
    given = kwargs.get("position_ids")
    if given is not None:
        return given + shift.to(given.device)[:, None]
    if bool((shift == shift.max()).all()):
        return None  # one prefix length: the model offsets positions by the cache length itself
    ids = kwargs.get("input_ids")
    embeddings = getattr(body, "embeddings", None)
    if hasattr(embeddings, "create_position_ids_from_input_ids"):  # RoBERTa family: pads keep padding_idx
        if ids is None:
            return None  # RoBERTa does not offset positions of inputs_embeds by the cache at all
        pad = embeddings.padding_idx
        base = embeddings.create_position_ids_from_input_ids(ids, pad, past)
        return torch.where(ids != pad, base + shift[:, None], base)
    return torch.arange(past, past + length, device=shift.device)[None] + shift[:, None]
