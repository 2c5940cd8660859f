"""The error a data file raises when it cannot be trusted: it names the file, line and column."""

from __future__ import annotations

from pathlib import Path

from controller.errors import VoltpoolError


class DataFileError(VoltpoolError, ValueError):
    """A data file that voltpool refuses to read, with where and why.

    `line` is the file's line number as an editor shows it (the header is line 1), or None when
    the problem concerns the whole file; `column` is the column's name, or None.
    """

    def __init__(
        self, path: Path | str, reason: str, *, line: int | None = None, column: str | None = None
    ) -> None:
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {reason}")
        self.path = Path(path)
        self.line = line
        self.column = column
        self.reason = reason
