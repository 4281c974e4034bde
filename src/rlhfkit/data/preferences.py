"""Preference data for the reward model and the DPO family: comparisons and K-wise rankings read
from a file, and the stage's cache of sampled rankings (``rlhfkit.rankings`` samples them)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.config import PreferenceDataConfig
from rlhfkit.data.formats import read_records
from rlhfkit.data.records import (
    Comparison,
    Message,
    Ranking,
    messages_to_dicts,
)
from rlhfkit.errors import RlhfkitError


def as_ranking(record: Comparison | Ranking) -> Ranking:
    """A comparison is a ranking of two; its margin travels in meta."""
    if isinstance(record, Ranking):
        return record
    meta = {**record.meta, "margin": record.margin} if record.margin is not None else record.meta
    return Ranking(record.prompt, (record.chosen, record.rejected), (0, 1), meta=meta)


def read_rankings_file(source: str, data: PreferenceDataConfig) -> list[Ranking]:
    records, report = read_records(source, format=data.format, skip_bad=data.skip_bad)
    print(report.summary())
    bad = [r for r in records if not isinstance(r, (Comparison, Ranking))]
    if bad:
        raise RlhfkitError(f"{source}: holds {type(bad[0]).__name__} records; the reward model needs comparisons or rankings")
    return [as_ranking(r) for r in records]


def read_cached_rankings(path: Path) -> list[Ranking]:
    """Our own cache, read back as written: sampled completions may legitimately be empty (the
    policy ended at once), which the strict user-data reader would reject."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [Ranking(tuple(Message(**m) for m in r["prompt"]), tuple(r["completions"]), tuple(r["ranking"]), meta=r["meta"])
            for r in rows]


def write_rankings(rankings: list[Ranking], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for r in rankings:
            row = {"prompt": messages_to_dicts(r.prompt), "completions": list(r.completions), "ranking": list(r.ranks), "meta": r.meta}
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
