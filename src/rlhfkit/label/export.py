"""`rlhfkit label export`: the collected answers as the training files the stages read.

- ``rankings.jsonl``: ``{prompt, completions, ranking, meta}``, one row per labeller's ranking,
  dense ranks (0 = best, ties share a rank) — ``rlhfkit rm`` data (``read_rankings``);
- ``comparisons.jsonl``: ``{prompt, chosen, rejected, meta}``, every strictly ordered pair of
  those rankings (a tie gives no pair) — ``rlhfkit dpo`` / ``rlhfkit rm`` data;
- ``demonstrations.jsonl``: ``{prompt, completion, meta}``, the better answers labellers wrote —
  ``rlhfkit sft`` data;
- ``flags.jsonl``: ``{prompt, responses, note, meta}``, what was flagged unsafe, for review;
- ``meta.json``: what was exported and what was left out, and why.

Preferences leave out skips, rankings with every response tied (no order to learn), and every
task that any labeller flagged: one flag is reason enough to keep its responses out of training
until someone has looked. Demonstrations are kept from any answer, flagged ones included: a safe
answer to an unsafe request is exactly the demonstration wanted.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from rlhfkit.data.records import Ranking, messages_to_dicts
from rlhfkit.label.store import LabelRecord, Store

FILES = ("rankings.jsonl", "comparisons.jsonl", "demonstrations.jsonl", "flags.jsonl")


def _meta(label: LabelRecord) -> dict:
    submitted = datetime.fromtimestamp(label.created_at, timezone.utc).isoformat(timespec="seconds")
    return {**label.task_meta, "task_id": label.task_id, "labeller": label.labeller, "label_id": label.label_id,
            "submitted_at": submitted}


def export_rows(labels: list[LabelRecord]) -> tuple[dict[str, list[dict]], dict]:
    """The rows of each file, and the counts for meta.json."""
    flagged = {label.task_id for label in labels if label.kind == "flag"}
    rows: dict[str, list[dict]] = {name: [] for name in FILES}
    left_out = {"skipped": 0, "all_tied": 0, "rankings_of_flagged_tasks": 0}
    for label in labels:
        prompt = messages_to_dicts(label.prompt)
        meta = _meta(label)
        if label.demonstration:
            rows["demonstrations.jsonl"].append({"prompt": prompt, "completion": label.demonstration,
                                                 "meta": {**meta, "action": label.kind}})
        if label.kind == "skip":
            left_out["skipped"] += 1
        elif label.kind == "flag":
            rows["flags.jsonl"].append({"prompt": prompt, "responses": list(label.responses), "note": label.note,
                                        "meta": meta})
        elif label.task_id in flagged:
            left_out["rankings_of_flagged_tasks"] += 1
        elif len(set(label.ranks)) == 1:
            left_out["all_tied"] += 1
        else:
            ranking = Ranking(label.prompt, label.responses, label.ranks)
            rows["rankings.jsonl"].append({"prompt": prompt, "completions": list(label.responses),
                                           "ranking": list(label.ranks), "meta": meta})
            rows["comparisons.jsonl"] += [{"prompt": prompt, "chosen": label.responses[i],
                                           "rejected": label.responses[j], "meta": meta}
                                          for i, j in ranking.pairs()]
    counts = {name: len(r) for name, r in rows.items()}
    return rows, {"exported": counts, "left_out": left_out, "flagged_tasks": len(flagged), "answers": len(labels)}


def export(store: Store, out: str | Path) -> dict:
    """Write every file into ``out`` (each replaced whole, never left half-written); return meta."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, meta = export_rows(store.labels())
    for name, records in rows.items():
        _write(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    meta["exported_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
