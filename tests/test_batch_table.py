"""The Live screen's BatchTable on its own: only visible rows are drawn, the cursor
keys, the mouse, Enter, and widths that fit what is shown."""

from __future__ import annotations

import asyncio
from typing import Any

from textual.app import App, ComposeResult

from mailroom.monitor.batch_table import BatchTable, Column

COLUMNS = (Column("batch", "batch"), Column("rows", "rows", right=True), Column("error", "error"))


class TableApp(App[None]):
    def __init__(self) -> None:
        super().__init__()
        self.selected: list[str] = []
        self.drawn: list[str] = []

    def compose(self) -> ComposeResult:
        yield BatchTable(COLUMNS, styles={"error": {"bad": "bold red"}}, id="t")

    def on_batch_table_selected(self, event: BatchTable.Selected) -> None:
        self.selected.append(event.key)

    def cells(self, key: str) -> tuple[str, ...]:
        self.drawn.append(key)
        n = int(key[1:])
        return (key, str(n % 7), "bad" if n % 5 == 0 else "")


def run(test: Any, size: tuple[int, int] = (60, 12)) -> None:
    async def main() -> None:
        app = TableApp()
        async with app.run_test(size=size) as pilot:
            table = app.query_one(BatchTable)
            table.focus()
            await test(app, table, pilot)
    asyncio.run(main())


def test_a_repaint_draws_only_the_visible_rows() -> None:
    async def test(app: TableApp, table: BatchTable, pilot: Any) -> None:
        table.set_rows([f"r{n}" for n in range(500)], app.cells)
        await pilot.pause()
        assert table.row_count == 500
        drawn = set(app.drawn)
        assert 5 <= len(drawn) <= 12, len(drawn)  # a 12-line screen shows 11 rows at most
        assert drawn <= {f"r{n}" for n in range(12)}
        text = app.export_screenshot()
        assert "batch" in text and "r0" in text and "r499" not in text
    run(test)


def test_cursor_keys_scroll_the_cursor_into_view_and_enter_selects() -> None:
    async def test(app: TableApp, table: BatchTable, pilot: Any) -> None:
        table.set_rows([f"r{n}" for n in range(100)], app.cells)
        await pilot.pause()
        app.drawn.clear()
        await pilot.press("end")
        assert table.cursor_key == "r99"
        assert table.scroll_y > 80  # the last row is on screen
        await pilot.pause()
        assert "r99" in app.drawn and "r0" not in app.drawn
        await pilot.press("home", "down", "down", "pagedown")
        assert table.cursor_row > 2 and table.scroll_y >= 0
        row = table.cursor_row
        await pilot.press("enter")
        await pilot.pause()
        assert app.selected == [f"r{row}"]
    run(test)


def test_a_click_moves_the_cursor_and_a_second_click_selects() -> None:
    async def test(app: TableApp, table: BatchTable, pilot: Any) -> None:
        table.set_rows([f"r{n}" for n in range(20)], app.cells)
        await pilot.pause()
        await pilot.click(BatchTable, offset=(2, 4))  # line 0 is the header: row 3
        assert table.cursor_key == "r3" and app.selected == []
        await pilot.click(BatchTable, offset=(2, 4))
        await pilot.pause()
        assert app.selected == ["r3"]
    run(test)


def test_rows_replaced_keep_the_cursor_index_and_cells_read_back() -> None:
    async def test(app: TableApp, table: BatchTable, pilot: Any) -> None:
        table.set_rows([f"r{n}" for n in range(10)], app.cells)
        table.move_cursor(row=4)
        table.set_rows([f"r{n}" for n in range(3)], app.cells)
        assert table.cursor_row == 2  # clamped to the last row
        assert table.get_cell("r2", "rows") == "2" and table.get_row_at(0)[2] == "bad"
        assert table.get_row_index("r1") == 1 and table.keys() == ["r0", "r1", "r2"]
        table.clear()
        assert table.row_count == 0 and table.cursor_key is None
    run(test)


def test_a_column_widens_to_the_longest_cell_drawn_up_to_its_cap() -> None:
    long = "x" * 200

    def cells(key: str) -> tuple[str, ...]:
        return (key, "1", long if key == "r1" else "short")

    async def test(app: TableApp, table: BatchTable, pilot: Any) -> None:
        table.set_rows(["r0", "r1"], cells)
        await pilot.pause()
        await pilot.pause()
        text = app.export_screenshot()
        assert "x" * 40 in text  # cropped at the screen's edge, not at the header's width
    run(test, size=(70, 8))


def test_following_the_tail_scrolls_in_the_same_repaint_as_the_rows_arrive() -> None:
    async def test(app: TableApp, table: BatchTable, pilot: Any) -> None:
        # What the Live pane does each flush: new rows, then the cursor to the last one,
        # before any layout pass has shown a scrollbar.
        table.set_rows([f"r{n}" for n in range(100)], app.cells)
        table.move_cursor(row=99)
        assert table.scroll_y > 80
        await pilot.pause()
        assert "r99" in app.export_screenshot()
    run(test)
