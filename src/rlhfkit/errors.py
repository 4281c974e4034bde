"""User-facing errors. The CLI prints these as one clear message (no traceback) and exits 2."""

from __future__ import annotations


class RlhfkitError(Exception):
    """A mistake the user can fix: bad input, bad config, missing package. Never a bug."""


class ConfigError(RlhfkitError):
    pass


class TrainingDiverged(RlhfkitError):
    """Training broke down (non-finite weights, a loss blown up, a gradient stuck at 0): the run
    stops before anything is saved as finished."""


class DataError(RlhfkitError):
    """A malformed record. Names the file, the line (or row), the field and what was expected."""

    def __init__(
        self, path: str, line: int | None, field: str | None, problem: str, *, unit: str = "line"
    ):
        # ``unit`` is "row" for containers without lines (JSON arrays, Parquet, datasets).
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        self.unit = unit
        where = self.path if line is None else f"{self.path}, {unit} {line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")
