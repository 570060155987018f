"""The encoder front-ends, text in and results out, each row scored by its own adapter's head:

    bank.classify(texts, adapter) -> [{"label", "score", "scores"}]            classification banks
    bank.answer(questions, contexts, adapter) -> [{"answer", "score", "start"}]   QA banks
    bank.predict(rows) -> results      `peftkit predict --base` rows, for any task (generation too)

Mixed into AdapterBank; uses base.py's Holder (tokenizer, entries, settings), rows.py's forward
and _rows, and generate.py's generate.
"""
from ..errors import PeftkitError
from .rows import lead


class Frontends:
    def classify(self, texts, adapter) -> list[dict]:
        """{"label", "score", "scores"} per text, each scored by its row's adapter."""
        self._need("classification", "classify")
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = self._rows(adapter, len(texts))
        if None in rows:
            raise PeftkitError("classify needs an adapter for every row: the base model has no trained head")
        out = []
        for start in range(0, len(texts), self.batch_size):
            names = rows[start:start + self.batch_size]
            encoded = [self.tokenizer(t, truncation=True, max_length=self._setting(n, "max_length"))
                       for t, n in zip(texts[start:start + self.batch_size], names)]
            batch = self.tokenizer.pad(encoded, return_tensors="pt").to(self.model.device)
            logits = self.forward(names, **batch).logits.float()
            for row, name in zip(logits, names):
                labels = self.entries[lead(name)].labels
                probs = row[:len(labels)].softmax(-1).tolist()
                best = max(range(len(labels)), key=probs.__getitem__)
                out.append({"label": labels[best], "score": round(probs[best], 4),
                            "scores": {label: round(p, 4) for label, p in zip(labels, probs)}})
        return out

    def answer(self, questions, contexts, adapter) -> list[dict]:
        """{"answer", "score", "start"} per question: the best span of its context (over windows)."""
        from ..tasks.qa import best_span, question_windows
        self._need("qa", "answer")
        questions, contexts = list(questions), list(contexts)
        if len(questions) != len(contexts):
            raise PeftkitError(f"{len(questions)} questions but {len(contexts)} contexts")
        rows = self._rows(adapter, len(questions))
        if None in rows:
            raise PeftkitError("answer needs an adapter for every row: the base model has no trained head")
        windows = []  # (question index, {input name: ids}, offsets, sequence ids)
        groups = {}
        for q, name in enumerate(rows):
            groups.setdefault((self._setting(name, "max_length"), self._setting(name, "doc_stride")), []).append(q)
        for (max_length, stride), members in groups.items():
            enc = question_windows(self.tokenizer, [questions[q] for q in members], [contexts[q] for q in members],
                           max_length, stride)
            names = [k for k in self.tokenizer.model_input_names if k in enc]
            for i, source in enumerate(enc["overflow_to_sample_mapping"]):
                windows.append((members[source], {k: enc[k][i] for k in names}, enc["offset_mapping"][i],
                                enc.sequence_ids(i)))
        best = [None] * len(questions)
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            batch = self.tokenizer.pad([w[1] for w in chunk], return_tensors="pt").to(self.model.device)
            out = self.forward([rows[w[0]] for w in chunk], **batch)
            width = out.start_logits.shape[1]
            for (q, _, offsets, sequence_ids), s, e in zip(chunk, out.start_logits.float().cpu().numpy(),
                                                          out.end_logits.float().cpu().numpy()):
                n = len(sequence_ids)  # the window's own tokens, without the batch's padding
                cut = slice(width - n, width) if self.tokenizer.padding_side == "left" else slice(0, n)
                span = best_span(s[cut], e[cut], offsets, sequence_ids)
                if span is not None and (best[q] is None or span[0] > best[q][0]):
                    best[q] = (span[0], contexts[q][span[1]:span[2]], span[3], span[1])
        return [{"answer": b[1], "score": round(float(b[2]), 4), "start": int(b[3])} if b else
                {"answer": "", "score": 0.0, "start": -1} for b in best]

    def predict(self, rows: list[dict]) -> list[dict]:
        """`peftkit predict --base ...` rows: each names its "adapter" (null: the base model, causal LMs
        only) and holds its input under the columns of that adapter's run recipe (by default "prompt",
        "text", or "question" and "context"). One result per row, in order."""
        names = []
        for n, row in enumerate(rows, 1):
            if "adapter" not in row:
                raise PeftkitError(f"row {n} does not name its adapter; add \"adapter\": one of "
                                   f"{', '.join(self.entries) or 'none loaded'}")
            names.append(row["adapter"])
        self._rows(names, len(rows))

        def column(n, row, name, key):
            recipe = self.entries[name].recipe if name else None
            key = getattr(recipe.data, key) if recipe else key
            if not isinstance(row.get(key), str):
                raise PeftkitError(f"row {n} needs a string {key!r} for adapter {name!r}; it has {sorted(row)}")
            return row[key]
        inputs = list(zip(range(1, len(rows) + 1), rows, names))
        if self.task == "causal-lm":
            out = [{"output": t} for t in self.generate([column(*i, "prompt") for i in inputs], names)]
        elif self.task == "classification":
            out = self.classify([column(*i, "text") for i in inputs], names)
        else:
            out = self.answer([column(*i, "question") for i in inputs], [column(*i, "context") for i in inputs], names)
        return [{"adapter": name, **o} for name, o in zip(names, out)]
