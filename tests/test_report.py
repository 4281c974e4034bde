"""`rlhfkit report`: one self-contained HTML page from a run folder's metrics, eval.json and pipeline.json."""

import json
import math
import re
from pathlib import Path

import pytest

from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.report import ReportConfig, report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
XSS = "<script>alert(1)</script>"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def sft_rows(steps: int = 20) -> list[dict]:
    rows = [{"step": 0, "eval/loss": 2.7, "eval/gold_score": 0.23, "eval/response_tokens": 25.0}]
    rows += [{"step": s, "train/loss": 2.0 / s, "train/lr": 1e-5} for s in range(1, steps + 1)]
    rows.append({"step": steps, "eval/loss": 0.9, "eval/gold_score": 0.56, "eval/response_tokens": 9.1})
    return rows


def make_run(root: Path) -> Path:
    """A run folder shaped like `rlhfkit run`'s: sft, labels (no metrics), rm, ppo, eval."""
    run = root / "run"
    write_jsonl(run / "sft" / "metrics.jsonl", sft_rows())
    (run / "sft" / "complete.json").write_text(json.dumps({"stage": "sft", "eval/gold_score": 0.56}))
    (run / "labels").mkdir()
    write_jsonl(run / "rm" / "metrics.jsonl",
                [{"step": 0, "eval/loss": 0.63, "eval/accuracy": 0.62}]
                + [{"step": s, "train/loss": 0.7 - 0.01 * s, "train/accuracy": 0.5 + 0.01 * s} for s in range(1, 16)]
                + [{"step": 15, "eval/loss": 0.5, "eval/accuracy": 0.75}])
    write_jsonl(run / "ppo" / "metrics.jsonl",
                [{"step": 0, "eval/gold_score": 0.557}]
                + [{"step": s, "ppo/score": -0.5 + 0.02 * s + 0.05 * math.sin(s), "ppo/kl": 0.1 * s,
                    "ppo/reward": -0.5 + 0.015 * s, "ppo/gold_score": 0.5 + 0.005 * s} for s in range(1, 31)]
                + [{"step": 30, "eval/gold_score": 0.647, "eval/vs_sft_win_rate": 0.617,
                    "eval/vs_sft_win_rate_low": 0.555, "eval/vs_sft_win_rate_high": 0.68}])
    model = lambda g, s, kl: {"path": "x", "kl_to_sft": kl,  # noqa: E731
                              "greedy": {"score": g, "score_low": g - 0.05, "score_high": g + 0.05,
                                         "eos_fraction": 0.9, "response_tokens": 12.3},
                              "sampled": {"score": s, "score_low": s - 0.05, "score_high": s + 0.05,
                                          "eos_fraction": 0.8, "response_tokens": 15.0}}
    ev = {"judge": "gold", "prompts": 128, "temperature": 1.0, "rl": "ppo",
          "models": {"base": model(0.4123, 0.3, None), "sft": model(0.5571, 0.38, None), "ppo": model(0.6473, 0.55, 2.4)},
          "win_rates": [
              {"model": "ppo", "against": "sft", "decoding": "greedy", "win_rate": 0.6171875, "low": 0.5546875,
               "high": 0.6796875, "wins": 48, "ties": 62, "losses": 18, "length_controlled": 0.58},
              {"model": "ppo", "against": "base", "decoding": "sampled", "win_rate": 0.75, "low": 0.7, "high": 0.8},
              {"model": "sft", "against": "base", "decoding": "greedy", "win_rate": 0.66, "low": None, "high": None}],
          "samples": [
              {"prompt": "What is 3+4? Answer with just the number.", "family": "arithmetic",
               "responses": {"base": f"maybe {XSS}", "sft": "7", "ppo": "Seven & <b>7</b>"},
               "gold": {"base": 0.2, "sft": 1.0, "ppo": 0.9}},
              {"prompt": f"Repeat {XSS}", "responses": {"base": None, "sft": "ok"}, "gold": None}]}
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(ev))
    stages = [("sft", 312.4), ("labels", 20.0), ("rm", 400.0), ("ppo", 900.0), ("eval", 120.0)]
    (run / "pipeline.json").write_text(json.dumps({
        "name": "demo<run>", "recipe": "smollm2", "algo": "ppo",
        "stages": [{"name": n, "folder": n, "kind": n, "seconds": t, "status": "done"} for n, t in stages]}))
    return run


def images(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)


def assert_valid_pngs(folder: Path, names: list[str]) -> None:
    for name in names:
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC, name


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    run = make_run(tmp_path_factory.mktemp("report"))
    path = write_report(run)
    return run, path.read_text()


def test_report_is_one_self_contained_page(full_report):
    run, page = full_report
    assert (run / "report.html").is_file()
    assert 'src="http' not in page and "<link" not in page and "<script" not in page.lower()
    assert not list(run.glob(".*.tmp")) and not list((run / "plots").glob(".*.tmp"))  # atomic writes cleaned up


def test_text_from_the_run_is_escaped(full_report):
    _, page = full_report
    assert XSS not in page and "<b>7</b>" not in page and "demo<run>" not in page
    assert "maybe &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Repeat &lt;script&gt;" in page and "Seven &amp; &lt;b&gt;7&lt;/b&gt;" in page


def test_headline_table_has_scores_win_rates_and_how_they_are_computed(full_report):
    _, page = full_report
    assert "0.412" in page and "0.557" in page and "0.647" in page  # greedy gold scores
    assert "61.7%" in page and "[55.5, 68.0]" in page  # PPO vs SFT with its interval
    assert "75.0%" in page and "66.0%" in page  # vs base, sampled and greedy
    assert "48-62-18 W-T-L" in page and "LC 58.0%" in page
    assert "2.40" in page  # KL to SFT
    assert "both orders" in page and "ties count half" in page and "bootstrap" in page


def test_samples_table_and_wall_times(full_report):
    _, page = full_report
    assert "<table class=samples>" in page and "What is 3+4? Answer with just the number." in page
    assert "gold 0.90" in page
    assert "0:05:12" in page and "0:15:00" in page and "0:29:12" in page  # sft, ppo, total


def test_every_plot_is_embedded_and_saved_as_a_png(full_report):
    run, page = full_report
    expected = ["win_rates.png", "reward_vs_kl.png", "curves_sft.png", "curves_rm.png", "curves_ppo.png"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(expected)
    assert_valid_pngs(run / "plots", expected)
    assert len(images(page)) == len(expected)


def test_a_run_with_only_sft_and_no_eval_still_reports(tmp_path, capsys):
    run = tmp_path / "partial"
    write_jsonl(run / "sft" / "metrics.jsonl", sft_rows())
    with (run / "sft" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "train/lo')  # the stage is still writing its log
    out = tmp_path / "elsewhere" / "r.html"
    assert report(ReportConfig(run_dir=str(run), out=str(out))) == out
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    assert "No eval/eval.json yet" in page and len(images(page)) == 1
    assert_valid_pngs(run / "plots", ["curves_sft.png"])


def test_stage_folders_are_found_without_pipeline_json_in_pipeline_order(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "grpo" / "metrics.jsonl", [{"step": s, "grpo/reward": 0.1 * s, "grpo/kl": 0.0} for s in range(1, 5)])
    # Online DPO: the stage's own log at the end of each round, DPO steps per round in iter_N/.
    online = run / "online_dpo"
    write_jsonl(online / "metrics.jsonl", [{"step": 5 * i, "online/reward_mean": -0.5 + 0.1 * i} for i in (1, 2)])
    for i in (1, 2):
        write_jsonl(online / f"iter_{i}" / "metrics.jsonl", [{"step": s, "dpo/loss": 0.69 - 0.01 * s} for s in range(1, 6)])
    page = write_report(run).read_text()
    assert page.index("<h3>online_dpo") < page.index("<h3>grpo")  # pipeline order, not alphabetical
    assert "10 logged steps" in page  # two rounds of 5 DPO steps, end to end (rounds' own log shares steps)
    assert "no KL term" in page  # GRPO's KL is all zeros: no frontier points, said so
    assert_valid_pngs(run / "plots", ["curves_online_dpo.png", "curves_grpo.png"])


def test_missing_and_null_fields_in_eval_json_do_not_break_the_report(tmp_path):
    """The eval stage may leave any field out or null; a reward-model judge gives negative scores."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval.json").write_text(json.dumps({
        "judge": "rm", "prompts": None,
        "models": {"base": None, "sft": {"greedy": None}, "dpo": {"greedy": {"score": -0.25}, "kl_to_sft": None}},
        "win_rates": [None, {"win_rate": "high"}, {"model": "dpo", "against": "sft", "win_rate": 0.4}],
        "samples": [None, {"prompt": None, "responses": ["not", "a", "dict"]}]}))
    page = write_report(run).read_text()
    assert "-0.250" in page and "40.0%" in page and "may be negative" in page
    assert_valid_pngs(run / "plots", ["win_rates.png"])


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RlhfkitError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(RlhfkitError, match="nothing to report"):
        write_report(tmp_path / "empty")
    (tmp_path / "bad" / "eval").mkdir(parents=True)
    (tmp_path / "bad" / "eval" / "eval.json").write_text("{not json")
    with pytest.raises(RlhfkitError, match=r"eval\.json: not valid JSON"):
        write_report(tmp_path / "bad")
