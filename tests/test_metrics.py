"""The metric vocabulary (rlhfkit.metrics): every key a run logs is documented there, and every
key the report and the pipeline read is one a stage logs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from rlhfkit.metrics import METRICS, known

SRC = Path(__file__).resolve().parents[1] / "src" / "rlhfkit"
NAMESPACES = ("train/", "eval/", "ppo/", "grpo/", "dpo/", "online/", "gpu/")


def logged_keys(folder: Path) -> set[str]:
    """Every key of every metrics.jsonl below ``folder``, and the namespaced keys of complete.json."""
    keys = set()
    for path in folder.rglob("metrics.jsonl"):
        for line in path.read_text().splitlines():
            keys |= set(json.loads(line))
    for path in folder.rglob("complete.json"):
        keys |= {k for k in json.loads(path.read_text()) if k.startswith(NAMESPACES)}
    return keys


def assert_documented(folder: Path) -> None:
    keys = logged_keys(folder)
    assert keys, f"no metrics under {folder}"
    unknown = sorted(k for k in keys if not known(k))
    assert not unknown, f"logged but not in rlhfkit/metrics.py: {unknown}"


def test_the_tiny_pipelines_stages_log_only_documented_metrics(tiny_run):
    assert_documented(tiny_run)


def test_the_report_and_the_pipeline_read_only_documented_metrics():
    for name in ("eval/report.py", "pipeline.py", "eval/headline.py"):
        for node in ast.walk(ast.parse((SRC / name).read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(NAMESPACES) \
                    and node.value not in NAMESPACES and " " not in node.value:
                assert known(node.value), f"{name} reads {node.value!r}, which no stage documents"


def test_names_with_a_placeholder_match_any_name_and_nothing_else():
    assert known("eval/gold/arithmetic") and known("eval/accuracy_k4") and known("ppo/score")
    assert not known("eval/gold/") and not known("ppo/scor") and not known("eval/gold/a/b")
    assert all(key.startswith(NAMESPACES) or key == "step" for key in METRICS)
