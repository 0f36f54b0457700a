"""Box tables and sizes like Hoster's (hoster_tasks/cli/table.py)."""

from __future__ import annotations

import pytest

from hoster_tasks.cli.table import human_size, render, snapshot_table


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0K"),
        (1023, "0K"),
        (1024, "1K"),
        (500_000, "488K"),
        ((1 << 20) - 1, "1023K"),
        (1 << 20, "1M"),
        (2068480, "1M"),
        (2912256, "2M"),
        ((1 << 30) - 1, "1023M"),
        (1 << 30, "1G"),
        (5 * (1 << 30) + 123, "5G"),
        (1 << 40, "1T"),
        (3 * (1 << 40), "3T"),
    ],
)
def test_human_size(n: int, text: str) -> None:
    assert human_size(n) == text


ROWS = [
    {"vm": "web1", "snapshot": "zroot/vm-encrypted/web1@hourly_2024-01-01_01-33-00", "used": 2068480},
    {"vm": "db:01", "snapshot": "zroot/vm-encrypted/db:01@daily_2024-01-01_04-05-00", "used": 2912256},
    {"vm": "x", "snapshot": "zroot/vm-encrypted/x@custom_2024-01-01_00-00-00", "used": 0},
]


def test_snapshot_table_structure() -> None:
    lines = snapshot_table(ROWS).splitlines()
    widths = {len(line) for line in lines}
    assert len(widths) == 1, lines
    # top, title, header separator, header, then (separator, row) per row, bottom
    assert len(lines) == 4 + 2 * len(ROWS) + 1
    assert lines[0][0] == "╭" and lines[0][-1] == "╮" and set(lines[0][1:-1]) == {"─"}
    assert lines[1].startswith("│") and lines[1].endswith("│")
    assert lines[1].strip("│").strip() == "Hoster ZFS Snapshots"
    assert lines[2][0] == "├" and lines[2][-1] == "┤" and lines[2].count("┬") == 4
    assert [h.strip() for h in lines[3].strip("│").split("│")] == [
        "#", "VM Name", "Snapshot Name", "Snapshot Size Human", "Snapshot Size Bytes",
    ]
    for sep in lines[4:-1:2]:
        assert sep[0] == "├" and sep[-1] == "┤" and sep.count("┼") == 4 and "┬" not in sep
    assert lines[-1][0] == "╰" and lines[-1][-1] == "╯" and lines[-1].count("┴") == 4


def test_snapshot_table_cells() -> None:
    lines = snapshot_table(ROWS).splitlines()
    body = [[c.strip() for c in line.strip("│").split("│")] for line in lines[5:-1:2]]
    assert body == [
        ["1", "web1", ROWS[0]["snapshot"], "1M", "2068480"],
        ["2", "db:01", ROWS[1]["snapshot"], "2M", "2912256"],
        ["3", "x", ROWS[2]["snapshot"], "0K", "0"],
    ]


def test_columns_line_up() -> None:
    lines = snapshot_table(ROWS).splitlines()
    joints = [i for i, ch in enumerate(lines[2]) if ch == "┬"]
    for line in lines[3:-1]:
        assert [i for i, ch in enumerate(line[1:-1], start=1) if ch in "│┼"] == joints
    assert [i for i, ch in enumerate(lines[-1]) if ch == "┴"] == joints


def test_numbers_right_aligned_text_left_aligned() -> None:
    lines = snapshot_table(ROWS).splitlines()
    first, last = lines[5], lines[9]
    first_cells = first.strip("│").split("│")
    last_cells = last.strip("│").split("│")
    assert first_cells[4].endswith("2068480 ")
    assert last_cells[4].endswith(" 0 ") and last_cells[4].startswith("  ")  # right-aligned
    assert first_cells[1].startswith(" web1 ") and first_cells[1].endswith("  ")  # left-aligned


def test_empty_table() -> None:
    lines = snapshot_table([]).splitlines()
    assert len(lines) == 5
    assert len({len(line) for line in lines}) == 1


def test_render_one_separator_between_body_rows() -> None:
    text = render("T", ("a", "b"), [(1, 2), (3, 4), (5, 6)], right=(0,))
    lines = text.splitlines()
    assert [line[0] for line in lines] == ["╭", "│", "├", "│", "├", "│", "├", "│", "├", "│", "╰"]
    assert len({len(line) for line in lines}) == 1


def test_render_long_title_keeps_box_rectangular() -> None:
    lines = render("Hoster ZFS Snapshots on every live node", ("a", "b"), [(1, 2)]).splitlines()
    assert len({len(line) for line in lines}) == 1
