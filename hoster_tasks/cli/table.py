"""Box tables drawn like Hoster's (`hoster snapshot list-all`)."""

from __future__ import annotations

from collections.abc import Sequence


def human_size(n: int) -> str:
    """Hoster's short sizes: whole units, rounded down (2068480 -> '1M', 0 -> '0K')."""
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20)):
        if n >= size:
            return f"{n // size}{unit}"
    return f"{n // 1024}K"


def render(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """Columns in `right` are right-aligned (numbers); others centred in the header, left in the body."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) + 2 for i, h in enumerate(headers)]
    widths[-1] += max(0, len(title) + 2 - (sum(widths) + len(widths) - 1))  # a long title widens the box
    inner = sum(widths) + len(widths) - 1
    out = ["╭" + "─" * inner + "╮", "│" + title.center(inner) + "│"]
    out.append("├" + "┬".join("─" * w for w in widths) + "┤")
    out.append("│" + "│".join(h.center(w) for h, w in zip(headers, widths, strict=True)) + "│")
    for row in cells:
        out.append("├" + "┼".join("─" * w for w in widths) + "┤")
        out.append(
            "│"
            + "│".join(
                (" " + c.rjust(w - 2) + " ") if i in right else (" " + c.ljust(w - 2) + " ")
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + "│"
        )
    out.append("╰" + "┴".join("─" * w for w in widths) + "╯")
    return "\n".join(out)


def snapshot_table(rows: Sequence[dict[str, object]], title: str = "Hoster ZFS Snapshots") -> str:
    body = [
        (i, r["vm"], r["snapshot"], human_size(int(r["used"])), r["used"])  # type: ignore[call-overload]
        for i, r in enumerate(rows, start=1)
    ]
    headers = ("#", "VM Name", "Snapshot Name", "Snapshot Size Human", "Snapshot Size Bytes")
    return render(title, headers, body, right=(0, 3, 4))
