"""What :func:`torchkeep.transfer` did with every tensor: the :class:`TransferReport` dataclass
with its counts and its text and JSON renderings, kept apart from the planning and applying in
:mod:`torchkeep.transfer` so the CLI and the migration reports read it without them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["METHODS", "UNUSED_WARN_SHARE", "TransferReport"]

# How a loaded tensor was paired, the first word of its reason.
METHODS = ("exact", "library", "rule", "prefix", "structure", "tied")

# transfer() warns when more than this share of the source's elements goes unused.
UNUSED_WARN_SHARE = 0.05


def _shape_str(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _numel(shape: Sequence[int] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _brief(why: str, limit: int = 60) -> str:
    """The first clause of a reason, for one-line summaries (the table has it in full)."""
    head = why.split(" (", 1)[0].split(": ", 1)[0] if why.startswith("ambiguous") else why.split(" (", 1)[0]
    return head if len(head) <= limit else head[: limit - 3] + "..."


def percent(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a percentage that never rounds a partial share to 0% or 100%."""
    if whole <= 0 or part >= whole:
        return "100%"
    if part <= 0:
        return "0%"
    p = 100.0 * part / whole
    if p < 0.1:
        return "<0.1%"
    if p > 99.9:
        return ">99.9%"
    return f"{p:.1f}%"


@dataclass
class TransferReport:
    """What :func:`transfer` did (or, with ``dry_run``, would do) with every tensor.

    ``loaded`` maps each target tensor that received values to its source tensor, adapted
    ones included; ``adapted`` says how those were changed on the way; ``reasons`` says how
    each loaded pair was found ('exact', 'rule ...', 'prefix ...', 'structure: ...', 'tied ...').
    ``missing`` target tensors kept their init (``why_missing`` says why, where a source came
    close); ``unused`` maps source tensors that went nowhere to the reason.
    """

    loaded: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    why_missing: dict[str, str] = field(default_factory=dict)
    source: str = ""
    target: str = ""
    stripped: list[str] = field(default_factory=list)  # wrapper prefixes removed from source names
    target_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    dry_run: bool = False
    applied: bool = False
    # With transfer(..., optimizer=opt): every parameter's optimizer-state fate
    # (torchkeep.carry.migration.optimizer.OptimizerReport); with ema=: the EMA copy's own TransferReport.
    optimizer: Any = field(default=None, repr=False)
    ema: Any = field(default=None, repr=False)
    # What the plan did beyond pairing names: a library's key mapping applied, adapters used.
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every target tensor was loaded and every source tensor used."""
        return not self.missing and not self.unused

    def methods(self) -> dict[str, int]:
        """Loaded tensors counted by how they were paired (exact, rule, prefix, structure, tied)."""
        out = {m: 0 for m in METHODS}
        for r in self.reasons.values():
            out[r.split(" ", 1)[0].rstrip(":")] += 1
        return {m: n for m, n in out.items() if n}

    @property
    def ambiguous(self) -> dict[str, str]:
        """Unused source tensors that fit more than one target equally (none was guessed)."""
        return {s: why for s, why in self.unused.items() if why.startswith("ambiguous")}

    @property
    def counts(self) -> dict[str, int]:
        """Tensor counts, and element counts (``*_elements``) of the target and what it got."""
        return {"target": len(self.target_shapes), "source": len(self.source_shapes),
                "loaded": len(self.loaded), "adapted": len(self.adapted),
                "missing": len(self.missing), "unused": len(self.unused),
                "ambiguous": len(self.ambiguous),
                "target_elements": sum(_numel(s) for s in self.target_shapes.values()),
                "loaded_elements": sum(_numel(self.target_shapes.get(t)) for t in self.loaded),
                "source_elements": sum(_numel(s) for s in self.source_shapes.values()),
                "unused_elements": sum(_numel(self.source_shapes.get(s)) for s in self.unused)}

    def largest_missing(self, n: int = 5) -> list[tuple[str, int]]:
        """The ``n`` missing target tensors with the most elements, largest first."""
        sizes = [(t, _numel(self.target_shapes.get(t))) for t in self.missing]
        return sorted(sizes, key=lambda x: -x[1])[:n]

    def warning(self) -> str | None:
        """What :func:`transfer` logs as a WARNING: the headline and the largest missing tensors,
        when any target tensor kept its init or more than UNUSED_WARN_SHARE of the source's
        elements went unused; else None."""
        c = self.counts
        unused_share = c["unused_elements"] / c["source_elements"] if c["source_elements"] else 0.0
        if not self.missing and unused_share <= UNUSED_WARN_SHARE:
            return None
        parts = [self.headline(c)]
        if self.missing:
            parts.append("largest kept at init: " + ", ".join(
                f"{t} {_shape_str(self.target_shapes.get(t))} ({k:,} elements)"
                for t, k in self.largest_missing()))
        if unused_share > UNUSED_WARN_SHARE:
            big = sorted(self.unused, key=lambda s: -_numel(self.source_shapes.get(s)))[:3]
            parts.append(f"{percent(c['unused_elements'], c['source_elements'])} of the source's "
                         "elements unused, largest: " + ", ".join(
                             f"{s} {_shape_str(self.source_shapes.get(s))} ({_brief(self.unused[s])})"
                             for s in big))
        return "; ".join(parts)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """Table rows ``(fate, target, shape, source, detail)``: every target tensor in the
        target's order, then every unused source tensor (its shape in the shape column)."""
        out = []
        for t, shape in self.target_shapes.items():
            if t in self.loaded:
                fate = "adapted" if t in self.adapted else "loaded"
                detail = self.reasons.get(t, "")
                if t in self.adapted:
                    detail = f"{detail}; {self.adapted[t]}"
                out.append((fate, t, _shape_str(shape), self.loaded[t], detail))
            else:
                why = self.why_missing.get(t)
                out.append(("missing", t, _shape_str(shape), "-",
                            "kept its init" + (f" ({why})" if why else "")))
        for s, why in self.unused.items():
            out.append(("unused", "-", _shape_str(self.source_shapes.get(s)), s, why))
        return out

    def headline(self, counts: dict[str, int] | None = None) -> str:
        c = counts or self.counts
        share = percent(c["loaded_elements"], c["target_elements"])
        head = (f"transfer {self.source or 'source'} -> {self.target or 'target'}: "
                f"loaded {c['loaded']} of {c['target']} target tensors, {share} of the elements "
                f"({c['adapted']} adapted), {c['missing']} missing (kept their init), "
                f"{c['unused']} of {c['source']} source tensors unused")
        if c["ambiguous"]:
            head += f" ({c['ambiguous']} ambiguous, not guessed)"
        if self.dry_run:
            head += " [dry run: nothing changed]"
        return head

    def table(self) -> str:
        """The rows as an aligned plain-text table."""
        header = ("fate", "target", "shape", "source", "detail")
        rows = [header] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for r in rows:
            lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        parts = [self.headline()]
        methods = self.methods()
        if methods:
            parts.append("matched by: " + ", ".join(f"{m} {n}" for m, n in methods.items()))
        if self.stripped:
            parts.append("source prefixes stripped: " + ", ".join(self.stripped))
        parts += self.notes
        parts.append("")
        parts.append(self.table())
        if self.optimizer is not None:
            parts += ["", str(self.optimizer)]
        if self.ema is not None:
            parts += ["", "EMA: " + str(self.ema)]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: every field, shapes as lists, plus counts and methods."""
        return {
            "source": self.source, "target": self.target, "dry_run": self.dry_run,
            "applied": self.applied, "ok": self.ok, "counts": self.counts,
            "methods": self.methods(), "stripped": list(self.stripped), "notes": list(self.notes),
            "loaded": dict(self.loaded), "adapted": dict(self.adapted),
            "reasons": dict(self.reasons), "missing": list(self.missing),
            "why_missing": dict(self.why_missing), "unused": dict(self.unused),
            "target_shapes": {k: list(v) for k, v in self.target_shapes.items()},
            "source_shapes": {k: list(v) for k, v in self.source_shapes.items()},
            **({"optimizer": self.optimizer.to_dict()} if self.optimizer is not None else {}),
            **({"ema": self.ema.to_dict()} if self.ema is not None else {}),
        }

    def problems(self) -> list[str]:
        """One line per missing target and unused source tensor (what strict mode refuses)."""
        out = []
        for t in self.missing:
            why = self.why_missing.get(t)
            out.append(f"missing {t} {_shape_str(self.target_shapes.get(t))}" + (f": {why}" if why else ""))
        for s, why in self.unused.items():
            out.append(f"unused {s} {_shape_str(self.source_shapes.get(s))}: {why}")
        return out
