"""The Live screen's batches table: keyed rows drawn line by line, only where visible.

Why not Textual's ``DataTable``: at full speed the Live table takes ~50 new batches
and evicts ~50 old ones per repaint, and every batch's age cell changes each second.
``DataTable`` invalidates its whole cell cache on any change, re-renders every visible
cell through Rich and re-measures every new row; ``remove_row`` re-indexes the table.
Measured by ``benchmarks/test_monitor_cost.py``, that was ~45 % of a core at ~600
events/s (the target is 15 %).  This table knows its cells are short plain strings:
a repaint builds one :class:`~textual.strip.Strip` per visible line from ready
segments, and replacing all 500 rows costs a list and a dict.

It keeps the parts of ``DataTable`` an operator uses: a row cursor (arrows, j/k,
page keys, home/end, mouse click), zebra stripes, a fixed header, Enter posts
:class:`BatchTable.Selected`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

__all__ = ["BatchTable", "Column"]


class Column(NamedTuple):
    """A column: its header, its key, whether numbers are right-aligned, and a width cap."""

    label: str
    key: str
    right: bool = False
    max_width: int = 60


#: One row's cells, as shown.
Cells = tuple[str, ...]
#: Row strips kept for reuse (a screenful is ~50); past this the cache starts over.
STRIP_CACHE = 400


class BatchTable(ScrollView, can_focus=True):
    """A keyed, fixed-column table with a row cursor, repainted only where visible."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor_up", show=False),
        Binding("down", "cursor_down", show=False),
        Binding("pageup", "page_up", show=False),
        Binding("pagedown", "page_down", show=False),
        Binding("home", "first", show=False),
        Binding("end", "last", show=False),
        Binding("enter", "select", show=False),
    ]

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "batch-table--header", "batch-table--cursor", "batch-table--even",
    }

    DEFAULT_CSS = """
    BatchTable { background: $surface; }
    BatchTable > .batch-table--header { text-style: bold; background: $panel; color: $foreground; }
    BatchTable > .batch-table--even { background: $surface-lighten-1; }
    BatchTable > .batch-table--cursor { background: $block-cursor-blurred-background; }
    BatchTable:focus > .batch-table--cursor { background: $block-cursor-background;
                                               color: $block-cursor-foreground;
                                               text-style: $block-cursor-text-style; }
    """

    class Selected(Message):
        """Enter (or a click on the cursor row) chose the row with ``key``."""

        def __init__(self, table: BatchTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> BatchTable:
            return self.table

    def __init__(self, columns: Sequence[Column], *, styles: dict[str, dict[str, str]] | None = None,
                 **kwargs: Any) -> None:
        """``styles[column key][cell text]`` is a Rich style for that cell (e.g. a state)."""
        super().__init__(**kwargs)
        self.columns = tuple(columns)
        self._column_index = {c.key: i for i, c in enumerate(self.columns)}
        self._cell_styles = {self._column_index[k]: {text: Style.parse(s) for text, s in v.items()}
                             for k, v in (styles or {}).items()}
        self._keys: list[str] = []
        self._index: dict[str, int] = {}
        self._cells_of: Callable[[str], Cells] = lambda key: ()
        # Widths grow to fit every row drawn so far and never shrink (until clear()):
        # measuring only what is drawn keeps a repaint independent of the row count,
        # and columns that never narrow do not jump while rows scroll past.
        self._widths = [cell_len(c.label) for c in self.columns]
        self._line_styles: dict[str, Style] = {}
        self._grown = False
        self._strips: dict[tuple[str, int, Cells], Strip] = {}
        self.cursor_row = 0

    # ------------------------------------------------------------ data

    @property
    def row_count(self) -> int:
        """How many rows the table holds."""
        return len(self._keys)

    def keys(self) -> list[str]:
        """The row keys, top to bottom."""
        return list(self._keys)

    def get_row_at(self, index: int) -> Cells:
        """The cells of row ``index`` (IndexError past the end)."""
        return self._cells_of(self._keys[index])

    def get_row_index(self, key: str) -> int:
        """The index of the row with ``key`` (KeyError if there is none)."""
        return self._index[key]

    def get_cell(self, key: str, column: str) -> str:
        """The text of ``column`` in the row with ``key``."""
        if key not in self._index:
            raise KeyError(key)
        return self._cells_of(key)[self._column_index[column]]

    @property
    def cursor_key(self) -> str | None:
        """The key of the row under the cursor, or None when the table is empty."""
        return self._keys[self.cursor_row] if self._keys else None

    def set_rows(self, keys: Sequence[str], cells_of: Callable[[str], Cells]) -> None:
        """Show the rows ``keys``, in that order; ``cells_of(key)`` gives a row's cells
        when it is drawn (only visible rows are).  The cursor keeps its index."""
        self._keys = list(keys)
        self._index = {key: i for i, key in enumerate(self._keys)}
        self._cells_of = cells_of
        self.cursor_row = max(0, min(self.cursor_row, len(self._keys) - 1))
        self._resize()
        self.refresh()

    def clear(self) -> None:
        """Remove every row."""
        self._widths = [cell_len(c.label) for c in self.columns]
        self.set_rows([], lambda key: ())

    # ------------------------------------------------------------ cursor

    def move_cursor(self, *, row: int, animate: bool = False) -> None:
        """Put the cursor on row ``row`` (clamped) and scroll it into view."""
        row = max(0, min(row, len(self._keys) - 1))
        if row != self.cursor_row:
            self.cursor_row = row
            self.refresh()
        self._scroll_to_cursor()

    def _scroll_to_cursor(self) -> None:
        # ``force``: right after set_rows() no layout pass has shown the scrollbar yet,
        # and an unforced scroll would be ignored until the next flush.
        visible = max(1, self.scrollable_content_region.height - 1)  # minus the header
        top = int(self.scroll_y)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False, force=True)
        elif self.cursor_row >= top + visible:
            self.scroll_to(y=self.cursor_row - visible + 1, animate=False, force=True)

    def action_cursor_up(self) -> None:
        self.move_cursor(row=self.cursor_row - 1)

    def action_cursor_down(self) -> None:
        self.move_cursor(row=self.cursor_row + 1)

    def action_page_up(self) -> None:
        self.move_cursor(row=self.cursor_row - max(1, self.scrollable_content_region.height - 2))

    def action_page_down(self) -> None:
        self.move_cursor(row=self.cursor_row + max(1, self.scrollable_content_region.height - 2))

    def action_first(self) -> None:
        self.move_cursor(row=0)

    def action_last(self) -> None:
        self.move_cursor(row=len(self._keys) - 1)

    def action_select(self) -> None:
        if self._keys:
            self.post_message(self.Selected(self, self._keys[self.cursor_row]))

    def on_click(self, event: events.Click) -> None:
        row = int(self.scroll_y) + event.y - 1
        if event.y >= 1 and 0 <= row < len(self._keys):
            if row == self.cursor_row:
                self.action_select()
            self.move_cursor(row=row)

    # ------------------------------------------------------------ drawing

    def _resize(self) -> None:
        # Lines are cropped to the widget's width (the last column is the error text,
        # whole in the batch detail): a virtual width of 1 means no horizontal scrollbar.
        self.virtual_size = Size(1, len(self._keys) + 1)

    def on_resize(self) -> None:
        self._resize()

    def render_lines(self, crop: Region) -> list[Strip]:
        # The styles of this repaint, looked up once (``rich_style`` walks the DOM).
        base = self.rich_style
        styles = {
            "base": base,
            "header": base + self.get_component_rich_style("batch-table--header"),
            "cursor": base + self.get_component_rich_style("batch-table--cursor"),
            "even": base + self.get_component_rich_style("batch-table--even"),
        }
        if styles != self._line_styles:
            self._strips.clear()  # a theme or focus change: every strip is stale
            self._line_styles = styles
        lines = super().render_lines(crop)
        if self._grown:  # a row drawn in this repaint widened a column: draw again
            self._grown = False
            self.refresh()
        return lines

    def render_line(self, y: int) -> Strip:
        """Line ``y`` of the widget: the header at 0, then the rows from the scroll position."""
        width = self.scrollable_content_region.width
        styles = self._line_styles or {"base": self.rich_style}
        base = styles["base"]
        if y == 0:
            return self._strip([c.label for c in self.columns], styles.get("header", base), {}, width)
        index = int(self.scroll_y) + y - 1
        if index >= len(self._keys):
            return Strip.blank(width, base)
        cells = self._cells_of(self._keys[index])
        widths = self._widths
        for i, text in enumerate(cells):
            if len(text) > widths[i] and widths[i] < self.columns[i].max_width:
                widths[i] = min(len(text), self.columns[i].max_width)
                self._grown = True
                self._strips.clear()
        kind = "cursor" if index == self.cursor_row else "even" if index % 2 else "base"
        # Most visible rows look the same as at the last repaint (only shifted up as
        # new batches arrive): reuse their strips.
        cache_key = (kind, width, cells)
        strip = self._strips.get(cache_key)
        if strip is None:
            if len(self._strips) > STRIP_CACHE:
                self._strips.clear()
            cell_styles = {} if kind == "cursor" else self._cell_styles
            strip = self._strips[cache_key] = self._strip(cells, styles.get(kind, base), cell_styles, width)
        return strip

    def _strip(self, cells: Sequence[str], style: Style, cell_styles: dict[int, dict[str, Style]],
               width: int) -> Strip:
        segments = []
        for i, (text, w, column) in enumerate(zip(cells, self._widths, self.columns, strict=True)):
            shown = text if len(text) == w else set_cell_size(text, w) if not column.right \
                else text.rjust(w)[-w:]
            extra = cell_styles.get(i, {}).get(text) if cell_styles else None
            segments.append(Segment(f" {shown} ", style + extra if extra else style))
        strip = Strip(segments)
        return strip.crop(0, width).extend_cell_length(width, style) if strip.cell_length != width \
            else strip
