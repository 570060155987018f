"""Row selection: one adapter (or None: the base model alone) per batch row, set for one call and
cleared after it, so nothing carries over from one call to the next.

    bank.forward(adapter=None, **inputs)        the model's output for a tokenized batch
    bank.generate_ids(adapter=None, **inputs)   model.generate (greedy): prompt + new ids
    bank._rows(adapter, n)       one checked entry per row (a name, None, or a Stack or Average block),
                                 from one entry or a list
    with bank._use(rows): ...    select for one call, then clear
    bank._select(rows)           switch each method's tuners, the head switches and the LoRA plan

Houlsby, Pfeiffer, parallel and prefix are peftkit's own tuners, which take one adapter per row (MAM's
parts live in the prefix and bottleneck tuners, which switch it: Method.parts; a fusion lives in the
bottleneck tuner, which runs it by name), the bottleneck tuner also a Stack or Average of its
adapters; a Stack may start with a LoRA adapter;
LoRA is the bank's own hooks (lora.py); heads are switched per row (heads.py).
Mixed into AdapterBank; uses the model, entries, heads, lora hooks and lock of base.py's Holder.
"""
import importlib
from contextlib import contextmanager

import torch

from ..composition import Average, Block, Parallel, Stack, _bottleneck_methods
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
        blocks = list(dict.fromkeys(r for r in rows if isinstance(r, Block)))
        wrong = [b for b in blocks if not isinstance(b, (Stack, Average))]
        if wrong:
            raise PeftkitError(f"a bank row can run Stack or Average, not {wrong[0]!r}"
                               + (" (it repeats the batch: give the rows one adapter each instead)"
                                  if isinstance(wrong[0], Parallel) else
                                  " (load a saved fusion's folder into the bank and name it in the row)"))
        named = [a for r in rows for a in (r.adapters if isinstance(r, Block) else (r,))]
        unknown = sorted({str(r) for r in named if r is not None and r not in self.entries})
        if unknown:
            raise PeftkitError(f"unknown adapter(s) {', '.join(unknown)}; loaded: {', '.join(self.entries) or 'none'}")
        for block in blocks:
            self._check_block(block)
        return rows

    def _check_block(self, block) -> None:
        """A row's block: a Stack or Average of bottleneck adapters; a Stack may start with one LoRA
        adapter (LoRA changes the layers' weights, the bottleneck adapters then add after them)."""
        lora = [n for n in block.adapters if method(self.entries[n].method).peft_native]
        if lora and not (isinstance(block, Stack) and lora == [block.adapters[0]]):
            raise PeftkitError(f"{block!r}: LoRA adapters ({', '.join(lora)}) compose only first in a Stack, one "
                               "per row (LoRA changes the layers; bottleneck adapters add after them)")
        other = [n for n in block.adapters[len(lora):] if not _is_bottleneck(method(self.entries[n].method))]
        if other:
            raise PeftkitError(f"{block!r}: {other[0]!r} is {self.entries[other[0]].method}; a bank row composes "
                               f"bottleneck adapters ({', '.join(_bottleneck_methods())}) and one LoRA adapter "
                               "first in a Stack")

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
            return None if rows is None else _collapse([self._part(r, names) for r in rows])
        own = [m for m in kinds if not method(m).peft_native]
        for module, names in tuner_groups(own).items():  # methods sharing a tuner's state switch together
            importlib.import_module(module).set_active(self.model, pick(names))
        for switch in self.heads.values():
            switch.active = None if rows is None else _collapse([lead(r) for r in rows])
        self.lora.select(pick([m for m in kinds if method(m).peft_native]),
                         {n: e.lora for n, e in self.entries.items()})

    def _part(self, row, methods):
        """The part of a row's adapter (a name or a block) that tuners of `methods` run, or None."""
        if not isinstance(row, Block):
            return row if row and self.entries[row].method in methods else None
        names = [n for n in row.adapters if self.entries[n].method in methods]
        if len(names) == len(row.adapters):
            return row
        return Stack(*names) if len(names) > 1 else (names[0] if names else None)  # the rest of a Stack


def lead(row):
    """The adapter whose head and settings a row goes by: its own, or its block's last (the top of a Stack)."""
    return row.adapters[-1] if isinstance(row, Block) else row


def _collapse(names: list):
    """None when no row has an adapter, the name when all rows share one, else the list."""
    if all(n is None for n in names):
        return None
    return names[0] if all(n == names[0] for n in names) else list(names)


def _is_bottleneck(about) -> bool:
    return about.tuner_module == "peftkit.tuners.bottleneck"


def _batch_size(inputs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if inputs.get(key) is not None:
            return inputs[key].shape[0]
    raise PeftkitError("give input_ids or inputs_embeds")
