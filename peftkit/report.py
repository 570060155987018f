"""param_report(): how many parameters train, of how many, and where."""
import re


def param_report(model) -> "ParamReport":
    trainable = total = 0
    modules: dict[str, int] = {}
    for name, param in model.named_parameters():
        count = logical_numel(param)
        total += count
        if param.requires_grad:
            trainable += count
            module = re.sub(r"\.\d+\.", ".N.", name.rsplit(".", 1)[0])
            modules[module] = modules.get(module, 0) + count
    return ParamReport(trainable=trainable, total=total, ratio=trainable / total if total else 0.0,
                       modules=modules)


def logical_numel(param) -> int:
    # bitsandbytes packs two 4-bit weights per byte of its storage dtype, so the
    # tensor's numel undercounts the parameters it stands for.
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


class ParamReport(dict):
    """A dict (trainable, total, ratio, modules) that prints as a table."""

    def __str__(self) -> str:
        width = max([len(m) for m in self["modules"]] + [20])
        lines = [f"{'trainable module (layers folded to N)':<{width}}  {'params':>12}"]
        lines += [f"{m:<{width}}  {n:>12,}" for m, n in self["modules"].items()]
        lines.append("-" * (width + 14))
        lines.append(f"{'trainable':<{width}}  {self['trainable']:>12,}")
        lines.append(f"{'total':<{width}}  {self['total']:>12,}")
        lines.append(f"{'ratio':<{width}}  {self['ratio']:>12.4%}")
        return "\n".join(lines)
