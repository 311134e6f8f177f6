"""Plain-text and markdown tables for the CLI and reports."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence], headers: Sequence[str], align: str | None = None) -> str:
    """A fixed-width text table; `align` has one 'l' or 'r' per column (numbers right by default)."""
    cells = [[_cell(v) for v in row] for row in rows]
    if align is None:
        align = "".join(
            "r" if rows and all(_is_num(r[j]) for r in rows) else "l" for j in range(len(headers))
        )
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(headers)]

    def line(vals):
        return "  ".join(
            v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(vals, widths, align)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *[line(r) for r in cells]])


def markdown_table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
