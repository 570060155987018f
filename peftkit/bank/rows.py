"""Row selection: one adapter (or None: the base model alone) per batch row, set for one call and
cleared after it, so nothing carries over from one call to the next.

    bank.forward(adapter=None, **inputs)        the model's output for a tokenized batch
    bank.generate_ids(adapter=None, **inputs)   model.generate (greedy): prompt + new ids
    bank._rows(adapter, n)       one checked name-or-None per row, from one name or a list
    with bank._use(rows): ...    select for one call, then clear
    bank._select(rows)           switch each method's tuners, the head switches and the LoRA plan

Houlsby, Pfeiffer, parallel and prefix are peftkit's own tuners, which take one adapter per row (MAM's
parts live in the prefix and bottleneck tuners, which switch it: Method.parts);
LoRA is the bank's own hooks (lora.py); heads are switched per row (heads.py).
Mixed into AdapterBank; uses the model, entries, heads, lora hooks and lock of base.py's Holder.
"""
import importlib
from contextlib import contextmanager

import torch

from ..errors import PeftkitError
from ..methods import method, tuner_groups


class RowSelection:
    @torch.inference_mode()
    def forward(self, adapter=None, **inputs):
        """The model's output for a tokenized batch. `adapter`: one name (or None: the base model)
        for every row, or a list with one per row."""
        with self.lock, self._use(self._rows(adapter, _batch_size(inputs))):
            return self.model(**inputs)

    @torch.inference_mode()
    def generate_ids(self, adapter=None, **inputs):
        """model.generate (greedy) with one adapter, or one per row; returns prompt + new ids."""
        with self.lock, self._use(self._rows(adapter, _batch_size(inputs))):
            return self.model.generate(**{"do_sample": False, **inputs})

    def _rows(self, adapter, n: int) -> list:
        rows = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(rows) != n:
            raise PeftkitError(f"got {len(rows)} adapters for a batch of {n} rows; give one per row")
        unknown = sorted({str(r) for r in rows if r is not None and r not in self.entries})
        if unknown:
            raise PeftkitError(f"unknown adapter(s) {', '.join(unknown)}; loaded: {', '.join(self.entries) or 'none'}")
        return rows

    @contextmanager
    def _use(self, rows: list):
        """Select one adapter (or None) per batch row for one call, and clear the selection after."""
        try:
            self._select(rows)
            yield
        finally:
            self._select(None)

    def _select(self, rows) -> None:
        """Point every switch at `rows` (None: clear them all, so only the base model runs)."""
        kinds = {e.method for e in self.entries.values()}

        def pick(names):  # the rows' adapters of these methods, None for the other rows
            return None if rows is None else _collapse([n if n and self.entries[n].method in names else None
                                                        for n in rows])
        own = [m for m in kinds if not method(m).peft_native]
        for module, names in tuner_groups(own).items():  # methods sharing a tuner's state switch together
            importlib.import_module(module).set_active(self.model, pick(names))
        for switch in self.heads.values():
            switch.active = None if rows is None else _collapse(rows)
        self.lora.select(pick([m for m in kinds if method(m).peft_native]),
                         {n: e.lora for n, e in self.entries.items()})


def _collapse(names: list):
    """None when no row has an adapter, the name when all rows share one, else the list."""
    if all(n is None for n in names):
        return None
    return names[0] if all(n == names[0] for n in names) else list(names)


def _batch_size(inputs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if inputs.get(key) is not None:
            return inputs[key].shape[0]
    raise PeftkitError("give input_ids or inputs_embeds")
