"""Readers that turn user data files into canonical records (see ``records.py``).

Users bring data in whatever shape their tools wrote: Anthropic hh-rlhf transcripts, TRL's
preference and prompt-completion layouts (plain strings or chat message lists), ranking files,
and prompt lists, stored as JSON Lines, JSON, Parquet (each optionally gzipped), a
``datasets.save_to_disk`` folder, a directory of such files, or a Hugging Face hub name.

Each file's format is detected from its first row, every row is validated, and any malformed
record raises a ``DataError`` naming the file, the line (or row), the field, what was expected
and what was found, so a user can fix a bad record without reading this code. With
``skip_bad=True`` malformed records are counted and skipped instead; problems with the file
itself (missing, unreadable, empty) always raise.
"""

from __future__ import annotations

import enum
import gzip
import io
import itertools
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rlhfkit.data.records import (
    ROLES,
    Comparison,
    Demonstration,
    Message,
    Messages,
    Prompt,
    Ranking,
    Record,
    user,
)
from rlhfkit.errors import ConfigError, DataError


class Format(enum.Enum):
    AUTO = "auto"
    HH = "hh"
    PREFERENCE = "preference"
    DEMONSTRATION = "demonstration"
    RANKING = "ranking"
    PROMPT = "prompt"


# The keys each format needs, quoted in error messages so users can see what to rename.
_FORMAT_KEYS: dict[Format, str] = {
    Format.HH: "{chosen, rejected} as hh-rlhf '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts",
    Format.PREFERENCE: "{prompt, chosen, rejected} (or chosen/rejected message lists)",
    Format.DEMONSTRATION: "{prompt, completion} or {messages}",
    Format.RANKING: "{prompt, completions, ranking}",
    Format.PROMPT: "{prompt} (optional meta)",
}

_KIND: dict[Format, type] = {
    Format.HH: Comparison,
    Format.PREFERENCE: Comparison,
    Format.DEMONSTRATION: Demonstration,
    Format.RANKING: Ranking,
    Format.PROMPT: Prompt,
}
_KIND_NAME: dict[type, str] = {
    Comparison: "comparisons",
    Demonstration: "demonstrations",
    Ranking: "rankings",
    Prompt: "prompts",
}
_KIND_HINT: dict[type, str] = {
    Demonstration: "pass a file of prompt/completion or messages records",
    Comparison: "pass a file of prompt/chosen/rejected, hh-rlhf or ranking records",
    Ranking: "pass a file of prompt/completions/ranking records",
    Prompt: "pass a file of prompt records, or format='prompt' to read just each record's prompt",
}

_CONTAINERS = (".jsonl", ".json", ".parquet")
SUPPORTED_SUFFIXES: tuple[str, ...] = _CONTAINERS + tuple(s + ".gz" for s in _CONTAINERS)
_MAX_PROBLEMS = 5  # messages kept in ReadReport.problems; the rest are only counted


@dataclass
class ReadReport:
    """What a read did besides returning records, so silent data loss is visible to the user."""

    path: str
    format: Format
    records: int = 0
    skipped_bad: int = 0
    dropped_identical: int = 0
    resplit_prefix_mismatch: int = 0
    problems: list[str] = field(default_factory=list)
    dropped_all_tied: int = 0
    merged_duplicates: int = 0  # rankings that gave one text twice, kept once at its better rank
    empty_chosen: int = 0  # pairs that prefer saying nothing: real (the world has them), or a wrong field

    def summary(self) -> str:
        parts = [f"{self.path}: {self.records} records ({self.format.value})"]
        if self.dropped_identical:
            parts.append(f"dropped {self.dropped_identical} pairs with identical responses")
        if self.empty_chosen:
            parts.append(f"{self.empty_chosen} pairs prefer an empty response")
        if self.merged_duplicates:
            parts.append(f"{self.merged_duplicates} rankings gave a completion twice: kept once, at its better rank")
        if self.dropped_all_tied:
            parts.append(f"dropped {self.dropped_all_tied} rankings whose completions are all tied (no preference)")
        if self.resplit_prefix_mismatch:
            parts.append(
                f"{self.resplit_prefix_mismatch} pairs whose transcripts disagree before the "
                "final turn were split separately (kept the chosen prompt)"
            )
        if self.skipped_bad:
            parts.append(f"skipped {self.skipped_bad} malformed records")
        text = "; ".join(parts)
        return "\n".join([text, *(f"  {p}" for p in self.problems)])


@dataclass(frozen=True)
class _Where:
    """The file position a record came from; every validation error is raised through it."""

    path: str
    line: int | None
    unit: str = "line"

    def error(self, field_name: str | None, problem: str) -> DataError:
        return DataError(self.path, self.line, field_name, problem, unit=self.unit)


# A row as read from a container: the object, or the error that made it unreadable (invalid
# JSON, not an object). Errors are yielded rather than raised so ``skip_bad`` can skip the
# record and keep reading; a generator that raises cannot be resumed.
_RawRow = tuple[int, "dict | DataError"]


class _FileLevelError(DataError):
    """A problem with a whole file (wrong kind, mixed formats) that skip_bad must not skip."""


@dataclass
class _Source:
    path: str
    unit: str
    rows: Iterator[_RawRow]


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


def read_rows(source: str | Path, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield (line-or-row number, row dict) from any supported container.

    For a directory of files the numbers restart at each file. A malformed row raises.
    """
    for src in _open_sources(source, split):
        for number, row in src.rows:
            if isinstance(row, DataError):
                raise row
            yield number, row


PROJECT = "{project}"
"""A data path that starts with ``{project}/`` is relative to the repository checkout, so a built-in
recipe finds data kept beside the project (hh-rlhf in ../shared) from any working folder."""


def project_root() -> Path | None:
    """The repository checkout this package runs from (the folder with pyproject.toml above
    src/rlhfkit), or None for an installed copy, which has no project around it."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "rlhfkit").is_dir() else None


def resolve_source(source: str | Path) -> str | Path:
    """``{project}/REST``: REST under the repository checkout, else REST from the current folder
    (where ``../shared`` used to be looked up); any other source unchanged.

    Neither existing is a DataError naming both paths and where such data comes from."""
    if not (isinstance(source, str) and source.startswith(PROJECT + "/")):
        return source
    rest = source[len(PROJECT) + 1:]
    root = project_root()
    tried = ([("relative to the project checkout", (root / rest).resolve())] if root else []) + [
        ("from the current folder", Path(rest))]
    for _, path in tried:
        if path.exists():
            return path
    origin = (" (hh-rlhf's test splits come from github.com/anthropics/hh-rlhf: its helpful-base/test.jsonl.gz is "
              "helpful-base.jsonl.gz here, and so on)" if "hh-rlhf" in rest else "")
    raise DataError(
        source, None, None,
        f"not found {' nor '.join(f'{label} ({path})' for label, path in tried)}. Put the data at "
        f"{tried[0][1]}{origin}, or pass another path: the stage's --data.train, or for `rlhfkit run` "
        "--set SECTION.data.train=PATH for each stage that reads it",
    )


def _open_sources(source: str | Path, split: str) -> Iterator[_Source]:
    source = resolve_source(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            yield _Source(str(source), "row", _dataset_rows(_load_saved(path, split)))
        else:
            yield from (_file_source(p) for p in _data_files(path))
    elif path.is_file():
        yield _file_source(path)
    elif isinstance(source, str) and _looks_like_hub_name(source):
        yield _Source(source, "row", _dataset_rows(_load_hub(source, split)))
    else:
        raise DataError(str(source), None, None, "no such file or directory")


def _container_of(path: Path) -> tuple[str, bool]:
    """The container suffix (.jsonl/.json/.parquet) and whether the file is gzipped."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    base = name[:-3] if gzipped else name
    for suffix in _CONTAINERS:
        if base.endswith(suffix):
            return suffix, gzipped
    raise DataError(
        str(path), None, None,
        f"unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}, a directory of "
        "such files, a datasets.save_to_disk folder or a Hugging Face hub dataset name",
    )


def _file_source(path: Path) -> _Source:
    suffix, gzipped = _container_of(path)
    if suffix == ".jsonl":
        return _Source(str(path), "line", _jsonl_rows(path, gzipped))
    if suffix == ".json":
        return _Source(str(path), "row", _json_rows(path, gzipped))
    return _Source(str(path), "row", _parquet_rows(path, gzipped))


def _data_files(directory: Path) -> list[Path]:
    """Supported files in a directory, sorted; other files (READMEs, licences) are ignored."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and _is_supported(p))
    if not files:
        found = sorted(p.name for p in directory.iterdir())[:10]
        raise DataError(
            str(directory), None, None,
            f"directory holds no data files (supported: {', '.join(SUPPORTED_SUFFIXES)}); "
            f"found {found}",
        )
    return files


def _is_supported(path: Path) -> bool:
    return not path.name.startswith(".") and path.name.lower().endswith(SUPPORTED_SUFFIXES)


@contextmanager
def _file_errors(path: Path) -> Iterator[None]:
    """Turn low-level decoding failures into a DataError that names the file."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(str(path), None, None, f"corrupted gzip file: {e}") from e
    except PermissionError as e:
        raise DataError(str(path), None, None, f"cannot read the file: {e.strerror}") from e


def _open_binary(path: Path, gzipped: bool) -> IO[bytes]:
    return gzip.open(path, "rb") if gzipped else path.open("rb")


# Text is decoded here, line by line, so an encoding error names its line; "utf-8-sig" reads the
# byte-order mark that Windows tools write at the start of a UTF-8 file.
def _jsonl_rows(path: Path, gzipped: bool) -> Iterator[_RawRow]:
    with _file_errors(path), _open_binary(path, gzipped) as lines:
        for number, raw in enumerate(lines, start=1):
            at = _Where(str(path), number, "line")
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield number, at.error(None, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text.rstrip("\r\n"))  # so columns count within the line
            except json.JSONDecodeError as e:
                yield number, at.error(None, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            except RecursionError:
                yield number, at.error(None, "invalid JSON: nested too deeply to read")
                continue
            yield number, _as_row(value, at)


def _json_rows(path: Path, gzipped: bool) -> Iterator[_RawRow]:
    with _file_errors(path), _open_binary(path, gzipped) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(str(path), line, None, f"not UTF-8 text: byte 0x{raw[e.start]:02x}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        lines_hint = e.msg == "Extra data"
        hint = "; it looks like JSON Lines: rename it to .jsonl" if lines_hint else ""
        raise DataError(
            str(path), e.lineno, None, f"invalid JSON: {e.msg} at column {e.colno}{hint}"
        ) from e
    except RecursionError:
        raise DataError(str(path), None, None, "invalid JSON: nested too deeply to read") from None
    for number, value in enumerate(_top_level_list(data, path), start=1):
        yield number, _as_row(value, _Where(str(path), number, "row"))


def _top_level_list(data: Any, path: Path) -> list:
    """A JSON file holds a list of records, or an object wrapping one, like {"data": [...]}."""
    if isinstance(data, list):
        return data
    expected = (
        'expected a top-level list of objects or an object with one list value like {"data": [...]}'
    )
    if not isinstance(data, dict):
        raise DataError(str(path), None, None, f"{expected}, got {_type_name(data)}")
    lists = [key for key, value in data.items() if isinstance(value, list)]
    if len(lists) != 1:
        raise DataError(
            str(path), None, None, f"{expected}, got an object with keys {sorted(data)}"
        )
    if lists[0] in _RECORD_KEYS:
        raise DataError(
            str(path), None, None,
            f"{expected}; this looks like a single record (key '{lists[0]}'): wrap it in a list",
        )
    return data[lists[0]]


def _parquet_rows(path: Path, gzipped: bool) -> Iterator[_RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _file_errors(path):
        source = io.BytesIO(gzip.decompress(path.read_bytes())) if gzipped else path
    try:
        with pq.ParquetFile(source) as table:
            number = 0
            for batch in table.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
    except pa.ArrowException as e:
        raise DataError(str(path), None, None, f"not a readable Parquet file: {e}") from e


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_saved(path: Path, split: str) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                str(path), None, None, f"no split '{split}'; this dataset has {sorted(loaded)}"
            )
        return loaded[split]
    return loaded


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _looks_like_hub_name(source: str) -> bool:
    """'owner/name' or 'name', not something that is plainly a local file path."""
    return bool(_HUB_NAME.fullmatch(source)) and not source.lower().endswith(
        SUPPORTED_SUFFIXES + (".csv", ".tsv", ".txt", ".arrow")
    )


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except ConnectionError as e:
        raise DataError(
            name, None, None,
            f"no such file or directory, and the Hugging Face hub could not be reached to "
            f"load it as a dataset ({e})",
        ) from e
    except (FileNotFoundError, ValueError) as e:
        raise DataError(
            name, None, None,
            f"no such file or directory, and loading it from the Hugging Face hub failed ({e})",
        ) from e


def _dataset_rows(dataset: Iterable[dict]) -> Iterator[_RawRow]:
    return enumerate(dataset, start=1)


def _as_row(value: Any, at: _Where) -> dict | DataError:
    if isinstance(value, dict):
        return value
    return at.error(None, f"expected a JSON object (a record), got {_type_name(value)}")


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------

_HH_MARKER = "\n\nHuman:"
# Keys that say a row carries a response; a prompt-only file must not silently drop one.
_RESPONSE_LIKE = ("response", "responses", "output", "answer")
_RECORD_KEYS = {"prompt", "chosen", "rejected", "completion", "completions", "ranking", "messages"}


def _as_format(value: Format | str) -> Format:
    if isinstance(value, Format):
        return value
    try:
        return Format(str(value).lower())
    except ValueError:
        raise ConfigError(
            f"unknown data format {value!r}; expected one of {', '.join(f.value for f in Format)}"
        ) from None


def detect_format(row: dict, path: str | Path, line: int | None, *, unit: str = "line") -> Format:
    """Guess a row's format from its keys (and, for chosen/rejected strings, the hh markers)."""
    at = _Where(str(path), line, unit)
    keys = set(row)
    if keys & {"chosen", "rejected"}:
        _require(row, at, Format.PREFERENCE, "chosen", "rejected", hint=False)
        if "prompt" in keys or isinstance(row["chosen"], list):
            return Format.PREFERENCE
        if isinstance(row["chosen"], str) and _is_hh_transcript(row["chosen"]):
            return Format.HH
        raise at.error(
            "prompt",
            "missing; plain-string 'chosen'/'rejected' need a 'prompt' field, or must be hh-rlhf "
            "transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...')",
        )
    if keys & {"completions", "ranking"}:
        _require(row, at, Format.RANKING, "prompt", "completions", "ranking", hint=False)
        return Format.RANKING
    if "messages" in keys or "completion" in keys:
        return Format.DEMONSTRATION
    if "prompt" in keys:
        for key in _RESPONSE_LIKE:
            if key in keys:
                raise at.error(
                    key,
                    "not a recognised field; a demonstration's response goes in 'completion' "
                    "(pass format='prompt' to read only the prompts)",
                )
        return Format.PROMPT
    expected = "; ".join(f"{f.value}: {keys_}" for f, keys_ in _FORMAT_KEYS.items())
    raise at.error(None, f"unknown record format: found keys {sorted(keys)}; expected {expected}")


def _is_hh_transcript(text: str) -> bool:
    return _HH_MARKER in text or text.startswith("Human:")


def _require(row: dict, at: _Where, fmt: Format, *keys: str, hint: bool = True) -> None:
    """Fail on the first missing key, saying what the format needs and what the row looks like.

    ``hint`` is off inside detection itself, which the hint calls.
    """
    for key in keys:
        if key not in row:
            looks_like = _looks_like(row, fmt, at) if hint else ""
            raise at.error(
                key,
                f"missing; {fmt.value} records need {_FORMAT_KEYS[fmt]}, found keys "
                f"{sorted(row)}{looks_like}",
            )


def _looks_like(row: dict, fmt: Format, at: _Where) -> str:
    """A hint for a forced format that does not fit: what auto-detection makes of the row."""
    try:
        detected = detect_format(row, at.path, at.line, unit=at.unit)
    except DataError:
        return ""  # the row fits no format; the missing-key message already says what is wrong
    return "" if detected is fmt else f" (this looks like {detected.value} data)"


# --------------------------------------------------------------------------------------------
# Row parsing
# --------------------------------------------------------------------------------------------


def parse_row(
    row: dict,
    fmt: Format | str,
    path: str | Path,
    line: int | None,
    *,
    unit: str = "line",
    report: ReadReport | None = None,
) -> Record | None:
    """Validate one row as ``fmt`` and build its record.

    Returns None for a pair that carries no preference (identical responses), counting it in
    ``report.dropped_identical``; hh pairs split separately are counted in
    ``report.resplit_prefix_mismatch``.
    """
    fmt = _as_format(fmt)
    if fmt is Format.AUTO:
        fmt = detect_format(row, path, line, unit=unit)
    counts = report if report is not None else ReadReport(str(path), fmt)
    return _PARSERS[fmt](row, _Where(str(path), line, unit), counts)


def _parse_hh(row: dict, at: _Where, report: ReadReport) -> Comparison | None:
    _require(row, at, Format.HH, "chosen", "rejected")
    chosen, rejected = _string(row, "chosen", at), _string(row, "rejected", at)
    if chosen == rejected:
        report.dropped_identical += 1
        return None
    prompt, chosen_reply = _split_transcript(chosen, "chosen", at)
    _check_prompt(prompt, "chosen", at)
    rejected_prompt, rejected_reply = _split_transcript(rejected, "rejected", at)
    if rejected_prompt != prompt:
        # A known hh-rlhf defect (~1 in 1,000): each side is split at its own last Assistant
        # turn and the chosen conversation's history is kept as the prompt.
        report.resplit_prefix_mismatch += 1
    return Comparison(prompt, chosen_reply, rejected_reply, meta=_meta(row, at))


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def _split_transcript(text: str, name: str, at: _Where) -> tuple[Messages, str]:
    """An hh-rlhf transcript -> (the turns before the last Assistant turn, that turn's text)."""
    head, *parts = _HH_TURN.split(text)
    if head.strip():
        raise at.error(
            name, f"expected the transcript to start with '\\n\\nHuman:', got {head[:40]!r}"
        )
    turns = [Message(_HH_ROLE[role], body.strip()) for role, body in zip(parts[::2], parts[1::2])]
    if not any(turn.role == "assistant" for turn in turns):
        raise at.error(name, "no '\\n\\nAssistant:' turn found; expected an hh-rlhf transcript")
    if turns[-1].role != "assistant":
        raise at.error(
            name, "the transcript ends with a Human turn; expected a final Assistant turn"
        )
    if not turns[-1].content:
        raise at.error(name, "the final Assistant turn is empty")
    return tuple(turns[:-1]), turns[-1].content


def _parse_preference(row: dict, at: _Where, report: ReadReport) -> Comparison | None:
    _require(row, at, Format.PREFERENCE, "chosen", "rejected")
    if "prompt" in row:
        prompt = _prompt(row["prompt"], "prompt", at)
        chosen = _response(row["chosen"], "chosen", at, judged=True)
        rejected = _response(row["rejected"], "rejected", at, judged=True)
    else:
        prompt, chosen, rejected = _implicit_prompt_pair(row, at)
    if chosen == rejected:
        report.dropped_identical += 1
        return None
    report.empty_chosen += not chosen.strip()
    return Comparison(prompt, chosen, rejected, margin=_margin(row, at), meta=_meta(row, at))


def _implicit_prompt_pair(row: dict, at: _Where) -> tuple[Messages, str, str]:
    """TRL's implicit-prompt layout: both sides are whole conversations sharing all but the end."""
    if not isinstance(row["chosen"], list):
        raise at.error(
            "prompt",
            f"missing; with plain-string chosen/rejected a 'prompt' field is required "
            f"(chosen is {_type_name(row['chosen'])}){_looks_like(row, Format.PREFERENCE, at)}",
        )
    chosen = _messages(row["chosen"], "chosen", at)
    rejected = _messages(row["rejected"], "rejected", at)
    if chosen[:-1] != rejected[:-1]:
        raise at.error(
            "rejected",
            "without a 'prompt' field, chosen and rejected must share every message but the last",
        )
    prompt = chosen[:-1]
    _check_prompt(prompt, "chosen", at)
    return (prompt, _final_reply(chosen, "chosen", at, judged=True),
            _final_reply(rejected, "rejected", at, judged=True))


def _parse_demonstration(row: dict, at: _Where, report: ReadReport) -> Demonstration:
    if "messages" in row:
        messages = _messages(row["messages"], "messages", at)
        response = _final_reply(messages, "messages", at)
        _check_prompt(messages[:-1], "messages", at)
        return Demonstration(messages[:-1], response, meta=_meta(row, at))
    _require(row, at, Format.DEMONSTRATION, "prompt", "completion")
    prompt = _prompt(row["prompt"], "prompt", at)
    response = _response(row["completion"], "completion", at)
    return Demonstration(prompt, response, meta=_meta(row, at))


def _parse_ranking(row: dict, at: _Where, report: ReadReport) -> Ranking | None:
    _require(row, at, Format.RANKING, "prompt", "completions", "ranking")
    prompt = _prompt(row["prompt"], "prompt", at)
    completions, ranking = row["completions"], row["ranking"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise at.error(
            "completions",
            f"expected a list of at least 2 completions, got {_describe(completions)}",
        )
    if not isinstance(ranking, list) or len(ranking) != len(completions):
        raise at.error(
            "ranking",
            f"expected a list of {len(completions)} ranks (one per completion), got "
            f"{_describe(ranking)}",
        )
    for i, rank in enumerate(ranking):
        if not _is_int(rank) or not 0 <= rank < len(completions):
            raise at.error(f"ranking[{i}]", f"expected the rank of completion {i}, an integer from 0 (best) to "
                                            f"{len(completions) - 1}, got {rank!r}")
    texts = [_response(c, f"completions[{i}]", at, judged=True) for i, c in enumerate(completions)]
    # A text given twice (two identical samples) is one completion, at the better of its ranks:
    # its copies would make pairs of a text against itself.
    best: dict[str, int] = {}
    for text, rank in zip(texts, ranking):
        best[text] = min(rank, best.get(text, rank))
    if len(best) < len(texts):
        report.merged_duplicates += 1
        texts, ranking = list(best), list(best.values())
    if len(set(ranking)) == 1:
        report.dropped_all_tied += 1
        return None
    return Ranking(prompt, tuple(texts), _dense_ranks(ranking), meta=_meta(row, at))


def _dense_ranks(ranking: list[int]) -> tuple[int, ...]:
    """Ranks with gaps (competition ranking: 0, 1, 1, 3) -> 0..m with ties kept (0, 1, 1, 2)."""
    order = {rank: dense for dense, rank in enumerate(sorted(set(ranking)))}
    return tuple(order[rank] for rank in ranking)


def _parse_prompt(row: dict, at: _Where, report: ReadReport) -> Prompt:
    _require(row, at, Format.PROMPT, "prompt")
    return Prompt(_prompt(row["prompt"], "prompt", at), meta=_meta(row, at))


_PARSERS: dict[Format, Callable[[dict, _Where, ReadReport], Record | None]] = {
    Format.HH: _parse_hh,
    Format.PREFERENCE: _parse_preference,
    Format.DEMONSTRATION: _parse_demonstration,
    Format.RANKING: _parse_ranking,
    Format.PROMPT: _parse_prompt,
}


# --------------------------------------------------------------------------------------------
# Field validation
# --------------------------------------------------------------------------------------------

_MESSAGES_OR_STRING = "expected a string or a list of {role, content} messages"


def _prompt(value: Any, name: str, at: _Where) -> Messages:
    """A prompt is a non-empty string (one user turn) or messages ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise at.error(name, "expected a non-empty prompt, got an empty string")
        return user(_text(value, name, at))
    if isinstance(value, list):
        messages = _messages(value, name, at)
        _check_prompt(messages, name, at)
        return messages
    raise at.error(name, f"{_MESSAGES_OR_STRING}, got {_type_name(value)}")


def _check_prompt(messages: Messages, name: str, at: _Where) -> None:
    if not messages:
        raise at.error(name, "expected a prompt with at least one user message, got none")
    if messages[-1].role != "user":
        raise at.error(
            name, f"expected the prompt to end with a user message, got {messages[-1].role}"
        )


def _response(value: Any, name: str, at: _Where, judged: bool = False) -> str:
    """A response is a string, or messages whose last one is the assistant's reply.

    A demonstration must say something. A judged response (a side of a comparison, one of a
    ranking's completions) may be empty: a model that answers nothing is a real outcome that
    labelers rank, and the built-in world's candidates include it.
    """
    if isinstance(value, str):
        if not judged and not value.strip():
            raise at.error(name, "expected a non-empty response, got an empty string")
        return _text(value, name, at)
    if isinstance(value, list):
        return _final_reply(_messages(value, name, at), name, at, judged)
    raise at.error(name, f"{_MESSAGES_OR_STRING}, got {_type_name(value)}")


def _final_reply(messages: Messages, name: str, at: _Where, judged: bool = False) -> str:
    if not messages or messages[-1].role != "assistant":
        last = messages[-1].role if messages else "no messages"
        raise at.error(name, f"expected the last message to be from the assistant, got {last}")
    if not judged and not messages[-1].content.strip():
        raise at.error(f"{name}[{len(messages) - 1}].content", "the assistant reply is empty")
    return messages[-1].content


def _messages(value: Any, name: str, at: _Where) -> Messages:
    if not isinstance(value, list):
        raise at.error(
            name, f"expected a list of {{role, content}} messages, got {_type_name(value)}"
        )
    return tuple(_message(item, f"{name}[{i}]", at) for i, item in enumerate(value))


def _message(item: Any, name: str, at: _Where) -> Message:
    if not isinstance(item, dict):
        raise at.error(name, f"expected a {{role, content}} object, got {_type_name(item)}")
    role, content = item.get("role"), item.get("content")
    if role not in ROLES:
        raise at.error(f"{name}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise at.error(f"{name}.content", f"expected a string, got {_type_name(content)}")
    return Message(role, _text(content, f"{name}.content", at))


def _string(row: dict, name: str, at: _Where) -> str:
    if not isinstance(row[name], str):
        raise at.error(name, f"expected a string, got {_type_name(row[name])}")
    return _text(row[name], name, at)


def _text(value: str, name: str, at: _Where) -> str:
    """Text a tokenizer can read: JSON's "\\ud800" escape gives a lone surrogate, which is no
    Unicode character (the tokenizer raised TypeError)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise at.error(name, f"not valid Unicode text: a lone surrogate {value[e.start]!r} at character {e.start}") from None
    return value


def _margin(row: dict, at: _Where) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise at.error("margin", f"expected a finite number, got {value!r}")
    return float(value)


def _meta(row: dict, at: _Where) -> dict:
    value = row.get("meta")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise at.error("meta", f"expected an object, got {_type_name(value)}")
    return dict(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return _type_name(value)


# --------------------------------------------------------------------------------------------
# Reading whole sources
# --------------------------------------------------------------------------------------------


def read_records(
    source: str | Path,
    format: Format | str = "auto",
    skip_bad: bool = False,
    split: str = "train",
    limit: int | None = None,
) -> tuple[list[Record], ReadReport]:
    """Read every record of a file, directory, saved dataset or hub dataset.

    ``format`` forces a format instead of detecting it from each file's first row. ``limit``
    stops reading after that many records. ``split`` picks the split of a DatasetDict or hub
    dataset.
    """
    return _read(source, _as_format(format), skip_bad, split, limit, accept=None)


def read_demonstrations(
    source: str | Path, format: Format | str = "auto", **options: Any
) -> tuple[list[Demonstration], ReadReport]:
    """Read SFT demonstrations; any other kind of file raises before rows are parsed."""
    return _read(source, _as_format(format), accept=(Demonstration,), **_options(options))


def read_comparisons(
    source: str | Path, format: Format | str = "auto", **options: Any
) -> tuple[list[Comparison], ReadReport]:
    """Read preference pairs; rankings are expanded to every (better, worse) pair.

    The report counts records as read, so a ranking file reports rankings, not pairs.
    """
    records, report = _read(
        source, _as_format(format), accept=(Comparison, Ranking), **_options(options)
    )
    pairs = [
        pair
        for record in records
        for pair in (record.to_comparisons() if isinstance(record, Ranking) else [record])
    ]
    return pairs, report


def read_rankings(
    source: str | Path, format: Format | str = "auto", **options: Any
) -> tuple[list[Ranking], ReadReport]:
    """Read K-way rankings (InstructGPT-style reward model data), kept whole."""
    return _read(source, _as_format(format), accept=(Ranking,), **_options(options))


def read_prompts(
    source: str | Path, format: Format | str = "auto", **options: Any
) -> tuple[list[Prompt], ReadReport]:
    """Read prompts to sample from (PPO, evaluation); ``meta`` keeps each one's task data."""
    return _read(source, _as_format(format), accept=(Prompt,), **_options(options))


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """The wrappers forward read_records' keywords; a typo must not be silently ignored."""
    defaults = {"skip_bad": False, "split": "train", "limit": None}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; expected {sorted(defaults)}")
    return {**defaults, **options}


def _read(
    source: str | Path,
    fmt: Format,
    skip_bad: bool,
    split: str,
    limit: int | None,
    accept: tuple[type, ...] | None,
) -> tuple[list, ReadReport]:
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    if fmt is not Format.AUTO and accept is not None and _KIND[fmt] not in accept:
        raise ConfigError(
            f"format='{fmt.value}' reads {_KIND_NAME[_KIND[fmt]]}, but "
            f"{_KIND_NAME[accept[0]]} are expected here"
        )
    source = resolve_source(source)  # so the report names the file it read
    report = ReadReport(str(source), fmt)
    stream = _records(source, fmt, skip_bad, split, accept, report)
    try:
        records = list(itertools.islice(stream, limit))
    finally:
        stream.close()  # closes the open file when ``limit`` stopped the read early
    report.records = len(records)
    if not records and limit != 0:
        raise DataError(str(source), None, None, _nothing_read(report))
    if records and report.empty_chosen == len(records):
        raise DataError(str(source), None, "chosen", f"empty in all {len(records)} pairs; is the preferred "
                                                     "response in another field?")
    return records, report


def _records(
    source: str | Path,
    fmt: Format,
    skip_bad: bool,
    split: str,
    accept: tuple[type, ...] | None,
    report: ReadReport,
) -> Iterator[Record]:
    first_file: str | None = None
    for src in _open_sources(source, split):
        file_fmt = fmt
        rows_seen = 0
        for number, row in src.rows:
            rows_seen += 1
            try:
                if isinstance(row, DataError):
                    raise row
                if file_fmt is Format.AUTO:
                    file_fmt = detect_format(row, src.path, number, unit=src.unit)
                    first_file = _check_file_format(src.path, file_fmt, first_file, report, accept)
                record = parse_row(row, file_fmt, src.path, number, unit=src.unit, report=report)
            except _FileLevelError:
                raise
            except DataError as error:
                _skip_or_raise(error, skip_bad, report)
                continue
            if record is not None:
                yield record
        if rows_seen == 0:
            raise DataError(src.path, None, None, "no records: the file is empty")


def _check_file_format(
    path: str,
    fmt: Format,
    first_file: str | None,
    report: ReadReport,
    accept: tuple[type, ...] | None,
) -> str:
    """Record the detected format; every file of one read must hold the same format."""
    if first_file is not None and fmt is not report.format:
        raise _FileLevelError(
            path, None, None,
            f"holds {fmt.value} records but {first_file} holds {report.format.value} records; "
            "read files of different formats separately",
        )
    report.format = fmt
    _check_kind(fmt, accept, path)
    return first_file or path


def _check_kind(fmt: Format, accept: tuple[type, ...] | None, path: str) -> None:
    if accept is None or _KIND[fmt] in accept:
        return
    expected = accept[0]
    raise _FileLevelError(
        path, None, None,
        f"holds {_KIND_NAME[_KIND[fmt]]} ({fmt.value} format), expected {_KIND_NAME[expected]}; "
        f"{_KIND_HINT[expected]}",
    )


def _skip_or_raise(error: DataError, skip_bad: bool, report: ReadReport) -> None:
    if not skip_bad:
        raise error
    report.skipped_bad += 1
    if len(report.problems) < _MAX_PROBLEMS:
        report.problems.append(str(error))


def _nothing_read(report: ReadReport) -> str:
    problem = "no usable records"
    if report.skipped_bad:
        problem += f"; all {report.skipped_bad} malformed records were skipped, first: "
        problem += report.problems[0]
    if report.dropped_identical:
        problem += f"; {report.dropped_identical} pairs had identical responses"
    if report.dropped_all_tied:
        problem += f"; {report.dropped_all_tied} rankings had all their completions tied"
    return problem
