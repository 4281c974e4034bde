"""`rlhfkit report RUN_DIR`: one self-contained HTML page for a run folder.

The page reads what the stages already wrote and computes nothing new:

    RUN_DIR/pipeline.json        stage list, order and wall times (from `rlhfkit run`; optional)
    RUN_DIR/<stage>/metrics.jsonl    one JSON object per logged step (online DPO: also iter_N/)
    RUN_DIR/<stage>/complete.json    the stage's final metrics (optional)
    RUN_DIR/eval/eval.json       headline numbers, win rates and sample responses (optional)

and writes RUN_DIR/report.html plus every plot as a PNG under RUN_DIR/plots/ (stable names, so
two runs' plots can be compared file by file). Plots are embedded as base64 data URIs and the
page has no external CSS, JS or fonts: it can be mailed or attached to an issue as one file.
Every bit of text from the run (prompts, responses, names) goes through `html.escape`.

A folder that is itself one stage's output (it has metrics.jsonl) is reported as a one-stage run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rlhfkit.errors import RlhfkitError


@dataclass
class ReportConfig:
    """Write one self-contained HTML report (plots, win rates, sample responses) for a run folder."""

    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run folder made by `rlhfkit run` (or one stage's output folder, which has metrics.jsonl)."""
    out: str = ""
    """HTML file to write; default RUN_DIR/report.html. The PNG plots always go to RUN_DIR/plots/."""


def report(cfg: ReportConfig) -> Path:
    path = write_report(Path(cfg.run_dir), Path(cfg.out) if cfg.out else None)
    print(path)
    return path


# Display order when there is no pipeline.json to say it; unknown kinds come after, by name.
KIND_ORDER = ("sft", "labels", "rm", "ppo", "dpo", "online_dpo", "grpo", "bon", "eval")
RL_KINDS = ("ppo", "grpo", "online_dpo", "dpo")
MODEL_NAMES = {"base": "base", "sft": "SFT", "ppo": "PPO", "dpo": "DPO", "online_dpo": "online DPO",
               "online-dpo": "online DPO", "grpo": "GRPO"}
MODEL_COLORS = {"base": "#7f7f7f", "sft": "#1f77b4"}  # everything else (the RL model): RL_COLOR
RL_COLOR = "#d62728"

# Panels of a stage's plot: (title, keys drawn on it). A panel appears when the stage logged any
# of its keys, so one list serves every stage kind (SFT, RM, PPO, DPO, online DPO, GRPO).
PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("loss", ("train/loss", "dpo/loss", "eval/loss")),
    ("reward-model score", ("ppo/score", "ppo/reward", "grpo/reward", "online/reward_mean")),
    ("KL to the reference", ("ppo/kl", "grpo/kl")),
    ("gold score", ("ppo/gold_score", "grpo/gold_score", "online/sample_gold", "eval/gold_score")),
    ("accuracy", ("train/accuracy", "dpo/accuracy", "eval/accuracy", "eval/gold_accuracy")),
    ("margin", ("dpo/margin", "eval/margin")),
    ("response length (tokens)", ("ppo/response_tokens", "grpo/response_tokens", "eval/response_tokens")),
]
LABELS = {
    "train/loss": "train", "dpo/loss": "train", "eval/loss": "held-out",
    "ppo/score": "RM score", "ppo/reward": "score - KL penalty", "grpo/reward": "reward",
    "online/reward_mean": "mean reward of samples",
    "ppo/kl": "per response (summed over tokens)", "grpo/kl": "per token",
    "ppo/gold_score": "rollouts (sampled)", "grpo/gold_score": "rollouts (sampled)",
    "online/sample_gold": "samples", "eval/gold_score": "held-out, greedy",
    "train/accuracy": "train", "dpo/accuracy": "train", "eval/accuracy": "held-out",
    "eval/gold_accuracy": "held-out, agrees with gold",
    "dpo/margin": "train", "eval/margin": "held-out",
    "ppo/response_tokens": "rollouts", "grpo/response_tokens": "rollouts", "eval/response_tokens": "held-out, greedy",
}
# Final numbers shown under each stage's heading (from complete.json, else the last logged value).
FINAL_KEYS = ("eval/gold_score", "eval/accuracy", "eval/gold_accuracy", "eval/loss", "ppo/kl", "grpo/kl",
              "eval/vs_sft_win_rate", "eval/vs_sft_sampled_win_rate")
# The RL stage's per-step (KL, RM score, rollout gold) for the reward-vs-KL frontier.
FRONTIER_KEYS = (("ppo/kl", "ppo/score", "ppo/gold_score"), ("grpo/kl", "grpo/reward", "grpo/gold_score"))


# --- reading the run folder ---------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    kind: str  # sft, rm, ppo, dpo, online_dpo, grpo, labels, eval, ...
    folder: Path
    seconds: float | None = None  # wall time, from pipeline.json
    status: str = ""
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl rows, steps on one axis
    round_starts: list[int] = field(default_factory=list)  # online DPO: first step of each round
    final: dict = field(default_factory=dict)  # complete.json


def read_json(path: Path) -> Any:
    """A JSON file, or None when it is missing. Unreadable JSON is the user's to fix: say which file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RlhfkitError(f"{path}: not valid JSON ({e})") from e


def read_jsonl(path: Path) -> list[dict]:
    """metrics.jsonl rows with a numeric step. A stage still running may have a half-written last
    line, so lines that do not parse are skipped rather than failing the whole report."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and number(row.get("step")) is not None:
                rows.append(row)
    return rows


def read_metrics(folder: Path) -> tuple[list[dict], list[int]]:
    """The stage's rows; per-round logs (online DPO's iter_N/metrics.jsonl, each counting from 1)
    are laid end to end so they share the step axis of the stage's own log (steps 20, 40, ...)."""
    rows = read_jsonl(folder / "metrics.jsonl")
    rounds = sorted(folder.glob("iter_*/metrics.jsonl"), key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    starts, offset = [], 0
    for path in rounds:
        part = read_jsonl(path)
        starts.append(offset)
        rows += [{**row, "step": offset + row["step"]} for row in part]
        offset += max((int(row["step"]) for row in part), default=0)
    return rows, starts


def kind_of(folder: Path) -> str:
    final = read_json(folder / "complete.json")
    stage = final.get("stage") if isinstance(final, dict) else None
    return str(stage or folder.name).lower().replace("-", "_")


def find_stages(run_dir: Path, pipeline: dict) -> list[Stage]:
    """Stages in pipeline.json's order; without one, the subfolders that logged metrics."""
    entries = pipeline.get("stages")
    if isinstance(entries, list) and entries:
        stages = []
        for entry in (e for e in entries if isinstance(e, dict)):
            name = str(entry.get("name") or entry.get("folder") or "?")
            stages.append(Stage(name, str(entry.get("kind") or name).lower().replace("-", "_"),
                                run_dir / str(entry.get("folder") or name), number(entry.get("seconds")),
                                str(entry.get("status") or "")))
    elif (run_dir / "metrics.jsonl").is_file():  # a stage's own output folder
        stages = [Stage(kind_of(run_dir), kind_of(run_dir), run_dir)]
    else:
        folders = [p.parent for p in run_dir.glob("*/metrics.jsonl")]
        rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
        folders.sort(key=lambda f: (rank.get(kind_of(f), len(rank)), f.name))
        stages = [Stage(f.name, kind_of(f), f) for f in folders]
    for stage in stages:
        stage.rows, stage.round_starts = read_metrics(stage.folder)
        final = read_json(stage.folder / "complete.json")
        stage.final = final if isinstance(final, dict) else {}
    return stages


def find_eval(run_dir: Path, stages: list[Stage]) -> dict:
    folders = [s.folder for s in stages if s.kind == "eval"] + [run_dir / "eval"]
    for folder in folders:
        data = read_json(folder / "eval.json")
        if isinstance(data, dict):
            return data
    return {}


# --- small helpers: every field may be missing, null or the wrong type ---------------------------


def number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def as_dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def as_list(x: Any) -> list:
    return x if isinstance(x, list) else []


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = sorted((row["step"], number(row.get(key))) for row in rows if number(row.get(key)) is not None)
    return [p[0] for p in points], [p[1] for p in points]


def ema(values: list[float], span: float) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's so the first points are not pulled to 0."""
    alpha, avg, weight, out = 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg, weight = (1 - alpha) * avg + alpha * v, (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def smoothing_span(n: int) -> float:
    """EMA span for a curve of n points: a fifth of the run (PPO's per-step scores are noisy at
    32 rollouts a step), capped so a long run still shows its late changes."""
    return min(50.0, max(3.0, n / 5))


def model_name(key: str) -> str:
    return MODEL_NAMES.get(key, key)


def esc(x: Any) -> str:
    return html.escape(str(x))


def fmt(x: Any, digits: int = 3) -> str:
    x = number(x)
    return "—" if x is None else f"{x:.{digits}f}"


def pct(x: Any) -> str:
    x = number(x)
    return "—" if x is None else f"{100 * x:.1f}%"


def interval(value: Any, low: Any, high: Any, percent: bool = False) -> str:
    """'0.412 [0.360, 0.460]' (or in percent), dropping the bracket when a bound is missing."""
    show = pct if percent else fmt
    if number(value) is None:
        return "—"
    if number(low) is None or number(high) is None:
        return show(value)
    bounds = f"{100 * low:.1f}, {100 * high:.1f}" if percent else f"{low:.3f}, {high:.3f}"
    return f"{show(value)} <span class=ci>[{bounds}]</span>"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


# --- plots ----------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    # A bare Figure on the Agg canvas, not pyplot: no global backend switch in the caller's process
    # (a notebook keeps its own), and no figure registry to leak when many reports are written.
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def draw_series(ax, steps: list[float], values: list[float], label: str, color: str) -> None:
    """Dense per-step curves are noisy: raw points faint, an EMA on top.
    Sparse ones (periodic evals, a few rounds) are drawn as they are, with markers."""
    if len(values) >= 12:
        ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, ema(values, smoothing_span(len(values))), color=color, lw=1.8, label=f"{label} (EMA)")
    else:
        ax.plot(steps, values, color=color, marker="o", ms=4, lw=1.2, label=label)


def stage_plot(stage: Stage) -> Figure | None:
    panels = [(title, [k for k in keys if series(stage.rows, k)[0]]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(4.3 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (title, keys) in zip(axes, panels):
        # Same colour for the same role on every panel: training curves blue, held-out evals orange.
        train = iter(["#1f77b4", "#9467bd", "#8c564b"])
        held_out = iter(["#ff7f0e", "#2ca02c", "#e377c2"])
        for key in keys:
            color = next(held_out if key.startswith("eval/") else train)
            draw_series(ax, *series(stage.rows, key), f"{LABELS.get(key, key)} [{key}]", color)
        for i, start in enumerate(stage.round_starts[1:], 2):
            ax.axvline(start, color="#999999", ls=":", lw=0.8)
            ax.text(start, 1.0, f" round {i}", transform=ax.get_xaxis_transform(), fontsize=6, va="top", color="#666666")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{stage.name} ({stage.kind})", fontsize=10)
    return fig


def win_rate_plot(win_rates: list[dict]) -> Figure | None:
    rows = [w for w in win_rates if number(w.get("win_rate")) is not None]
    if not rows:
        return None
    fig = new_figure(7.0, 0.9 + 0.45 * len(rows))
    ax = fig.subplots()
    for y, w in enumerate(rows):
        rate, low, high = number(w.get("win_rate")), number(w.get("low")), number(w.get("high"))
        color = MODEL_COLORS.get(str(w.get("model")), RL_COLOR)
        sampled = w.get("decoding") == "sampled"
        ax.barh(y, rate, color=color, alpha=0.45 if sampled else 0.85, hatch="//" if sampled else None, height=0.6)
        if low is not None and high is not None:
            ax.errorbar(rate, y, xerr=[[max(rate - low, 0)], [max(high - rate, 0)]], color="black", capsize=3, lw=1)
        ax.text(min((high or rate) + 0.01, 0.9), y, f"{100 * rate:.1f}%", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{model_name(str(w.get('model')))} vs {model_name(str(w.get('against')))}"
                                     f" ({w.get('decoding') or '?'})" for w in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.5, color="black", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate (ties count half; bars: 95% bootstrap interval)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return fig


def frontier_plot(rl: Stage | None, models: dict, judge: str) -> tuple[Figure | None, list[str]]:
    """Reward vs KL: what the RL stage bought (RM score, gold) for how far it moved from SFT.
    Training points (per step, RM units, train prompts) and eval points (per model, judge units,
    held-out prompts) are on separate panels: their axes are different quantities."""
    notes, panels = [], []
    keys = next(((k, s, g) for k, s, g in FRONTIER_KEYS if rl and series(rl.rows, k)[0]), None)
    if keys and all(kl == 0 for kl in series(rl.rows, keys[0])[1]):
        # GRPO without a KL term logs 0 at every step: a vertical line of points says nothing.
        notes.append(f"{keys[0]} is 0 at every step (no KL term in the loss), so the training points are left out.")
    elif keys:
        kl_key = keys[0]
        for key in keys[1:]:
            points = [(number(r[kl_key]), number(r[key]), r["step"]) for r in rl.rows
                      if number(r.get(kl_key)) is not None and number(r.get(key)) is not None]
            if points:
                panels.append(("train", key, kl_key, points))
    evals = []
    for key, m in models.items():
        kl = number(as_dict(m).get("kl_to_sft"))
        kl = 0.0 if kl is None and key == "sft" else kl  # SFT is the reference: its KL to itself is 0
        greedy, sampled = as_dict(as_dict(m).get("greedy")), as_dict(as_dict(m).get("sampled"))
        if kl is not None and (number(greedy.get("score")) is not None or number(sampled.get("score")) is not None):
            evals.append((key, kl, greedy, sampled))
    if evals:
        panels.append(("eval", "", "", evals))
    if not panels:
        return None, notes
    fig = new_figure(4.3 * len(panels), 3.4)
    for ax, (where, key, kl_key, points) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        if where == "train":
            kls, ys, steps = zip(*points)
            dots = ax.scatter(kls, ys, c=steps, cmap="viridis", s=14, alpha=0.8)
            if len(points) >= 12:  # the mean of each eighth of the run: the way the run moved
                chunk = math.ceil(len(points) / 8)
                means = [(sum(kls[i:i + chunk]) / len(kls[i:i + chunk]), sum(ys[i:i + chunk]) / len(ys[i:i + chunk]))
                         for i in range(0, len(points), chunk)]
                ax.plot(*zip(*means), color="black", marker=".", lw=1.2, label="mean of each 1/8 of the run")
                ax.annotate("", means[-1], means[-2], arrowprops={"arrowstyle": "->", "lw": 1.2})
                ax.legend(fontsize=6)
            fig.colorbar(dots, ax=ax).set_label("step", fontsize=7)
            what = "gold score" if "gold" in key else "RM score"
            ax.set_title(f"{rl.name} rollouts: {what} vs KL", fontsize=9)
            ax.set_xlabel(f"KL to reference, {LABELS.get(kl_key, '')} [{kl_key}]", fontsize=7)
            ax.set_ylabel(f"{what} on training prompts [{key}]", fontsize=7)
        else:
            for name, kl, greedy, sampled in points:
                color = MODEL_COLORS.get(name, RL_COLOR)
                for decoding, stats, marker in (("greedy", greedy, "o"), ("sampled", sampled, "s")):
                    y = number(stats.get("score"))
                    if y is None:
                        continue
                    lo, hi = number(stats.get("score_low")), number(stats.get("score_high"))
                    err = [[max(y - lo, 0)], [max(hi - y, 0)]] if lo is not None and hi is not None else None
                    ax.errorbar(kl, y, yerr=err, fmt=marker, color=color, mfc=color if decoding == "greedy" else "white",
                                capsize=3)
                y = number(greedy.get("score"))
                ax.annotate(model_name(name), (kl, number(sampled.get("score")) if y is None else y),
                            xytext=(6, 4), textcoords="offset points", fontsize=7)
            ax.set_title(f"held-out eval: {judge} score vs KL to SFT", fontsize=9)
            ax.set_xlabel("KL to SFT per response, measured by the eval [kl_to_sft]", fontsize=7)
            ax.set_ylabel(f"{judge} score (bars: 95% interval)", fontsize=7)
            ax.margins(x=0.2)
            ax.legend([Line2D([], [], marker="o", color="black", ls=""),
                       Line2D([], [], marker="s", color="black", mfc="white", ls="")], ["greedy", "sampled"], fontsize=6)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return fig, notes


def save_png(fig: Figure, path: Path) -> str:
    """Write the PNG atomically and return it as a data URI for the page."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "stage"


# --- HTML -----------------------------------------------------------------------------------------


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1300px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; white-space: nowrap; }
.ci { color: #777; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
.samples td { white-space: pre-wrap; font-family: ui-monospace, Menlo, monospace; font-size: 0.8em; max-width: 380px; }
.gold { display: block; color: #555; font-family: system-ui, sans-serif; margin-top: 4px; }
.bar { background: #1f77b4; height: 10px; display: inline-block; }
img { max-width: 100%; }
"""


def img(uri: str, alt: str) -> str:
    return f'<p><img src="{uri}" alt="{esc(alt)}"></p>'


def headline_html(ev: dict) -> str:
    models = as_dict(ev.get("models"))
    win_rates = [as_dict(w) for w in as_list(ev.get("win_rates"))]
    judge = str(ev.get("judge") or "?")
    against = [a for a in ("sft", "base") if any(w.get("against") == a for w in win_rates)]
    against += [a for a in dict.fromkeys(str(w.get("against")) for w in win_rates) if a not in against]
    head = ["model", f"{judge} score, greedy", f"{judge} score, sampled"] + [f"win rate vs {model_name(a)}" for a in against]
    head += ["KL to SFT", "length (tokens), greedy / sampled", "EOS, greedy / sampled"]
    lines = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for key, m in models.items():
        m = as_dict(m)
        greedy, sampled = as_dict(m.get("greedy")), as_dict(m.get("sampled"))
        cells = [esc(model_name(key))]
        cells += [interval(d.get("score"), d.get("score_low"), d.get("score_high")) for d in (greedy, sampled)]
        for a in against:
            found = [w for w in win_rates if w.get("model") == key and w.get("against") == a]
            parts = []
            for w in found:
                text = f"{interval(w.get('win_rate'), w.get('low'), w.get('high'), percent=True)} {esc(w.get('decoding') or '')}"
                if all(isinstance(w.get(k), int) for k in ("wins", "ties", "losses")):
                    text += f" <span class=ci>{w['wins']}-{w['ties']}-{w['losses']} W-T-L</span>"
                if number(w.get("length_controlled")) is not None:
                    text += f" <span class=ci>(LC {pct(w.get('length_controlled'))})</span>"
                parts.append(text)
            cells.append("<br>".join(parts) or "—")
        cells.append(fmt(m.get("kl_to_sft"), 2))
        cells.append(f"{fmt(greedy.get('response_tokens'), 1)} / {fmt(sampled.get('response_tokens'), 1)}")
        cells.append(f"{pct(greedy.get('eos_fraction'))} / {pct(sampled.get('eos_fraction'))}")
        lines.append("<tr><td>" + cells[0] + "</td>" + "".join(f"<td class=num>{c}</td>" for c in cells[1:]) + "</tr>")
    lines.append("</table>")
    scale = ("gold scores are in [0, 1]" if judge == "gold" else
             "scores are mean reward-model rewards (not bounded; may be negative)" if judge == "rm" else "")
    lines.append(
        f"<p class=note>Judge: <b>{esc(judge)}</b>{esc('; ' + scale) if scale else ''}. "
        f"{esc(ev.get('prompts') or '?')} held-out prompts; sampled decoding at temperature {esc(ev.get('temperature', '?'))}. "
        "Score brackets: 95% interval. Win rate: each pair of responses is judged in both orders, (A, B) and (B, A), "
        "and the two verdicts averaged, so a judge's position bias cancels; ties count half; brackets are a 95% "
        "bootstrap interval over prompts. LC: length-controlled win rate, where the eval computed one.</p>")
    return "\n".join(lines)


def final_html(stage: Stage) -> str:
    last = {k: v for row in stage.rows for k, v in row.items()}  # the last logged value of each key
    values = {**last, **stage.final}
    parts = []
    for key in FINAL_KEYS:
        if number(values.get(key)) is None:
            continue
        if key.endswith("win_rate"):
            text = interval(values[key], values.get(f"{key}_low"), values.get(f"{key}_high"), percent=True)
        else:
            text = fmt(values[key])
        parts.append(f"{esc(key)} = {text}")
    return f"<p class=note>final: {'; '.join(parts)}</p>" if parts else ""


def samples_html(ev: dict) -> str:
    samples = [as_dict(s) for s in as_list(ev.get("samples"))]
    if not samples:
        return "<p class=note>No sample responses in eval.json.</p>"
    models = list(as_dict(ev.get("models")))
    for s in samples:  # models that answered but are missing from "models"
        models += [m for m in as_dict(s.get("responses")) if m not in models]
    lines = ["<table class=samples><tr><th>prompt</th>" + "".join(f"<th>{esc(model_name(m))}</th>" for m in models) + "</tr>"]
    for s in samples:
        responses, gold = as_dict(s.get("responses")), as_dict(s.get("gold"))
        family = f'<span class=gold>{esc(s["family"])}</span>' if s.get("family") else ""
        cells = [f"{esc(s.get('prompt', ''))}{family}"]
        for m in models:
            score = f'<span class=gold>gold {fmt(gold[m], 2)}</span>' if number(gold.get(m)) is not None else ""
            cells.append(f"{esc(responses.get(m) or '')}{score}")
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def times_html(stages: list[Stage]) -> str:
    timed = [s for s in stages if s.seconds is not None or s.status]
    if not timed:
        return "<p class=note>No pipeline.json with stage times.</p>"
    longest = max((s.seconds or 0 for s in timed), default=0) or 1
    lines = ["<table><tr><th>stage</th><th>kind</th><th>status</th><th>wall time</th><th></th></tr>"]
    for s in timed:
        bar = f'<span class=bar style="width:{int(200 * (s.seconds or 0) / longest)}px"></span>'
        lines.append(f"<tr><td>{esc(s.name)}</td><td>{esc(s.kind)}</td><td>{esc(s.status or '—')}</td>"
                     f"<td class=num>{duration(s.seconds)}</td><td>{bar}</td></tr>")
    total = sum(s.seconds or 0 for s in timed)
    lines.append(f"<tr><th colspan=3>total</th><th class=num>{duration(total)}</th><th></th></tr></table>")
    return "\n".join(lines)


# --- the report -----------------------------------------------------------------------------------


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the HTML report for ``run_dir`` (default ``run_dir/report.html``) and its PNGs under
    ``run_dir/plots/``; return the report's path. Raises RlhfkitError when there is nothing to show."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RlhfkitError(f"run folder {run_dir} does not exist")
    # 1. Read what the stages wrote.
    pipeline = as_dict(read_json(run_dir / "pipeline.json"))
    stages = find_stages(run_dir, pipeline)
    ev = find_eval(run_dir, stages)
    if not stages and not ev:
        raise RlhfkitError(f"{run_dir} has no pipeline.json, eval/eval.json or stage folders with metrics.jsonl: "
                           "nothing to report. Point at a folder made by `rlhfkit run` or at a stage's output folder.")
    rl_key = str(ev.get("rl") or pipeline.get("algo") or "")
    # The RL stage the eval names; else one that logged a KL (for the frontier); else any.
    rl_stages = [s for s in stages if s.kind in RL_KINDS]
    rl = next((s for s in rl_stages if rl_key in (s.kind, s.name)), None)
    rl = rl or next((s for s in rl_stages if any(series(s.rows, keys[0])[0] for keys in FRONTIER_KEYS)), None)
    rl = rl or next(iter(rl_stages), None)
    models = as_dict(ev.get("models"))
    judge = str(ev.get("judge") or "gold")

    # 2. Plots: saved under plots/ and embedded in the page.
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    uris: dict[str, str] = {}
    figures = {"win_rates": win_rate_plot([as_dict(w) for w in as_list(ev.get("win_rates"))])}
    figures["reward_vs_kl"], frontier_notes = frontier_plot(rl, models, judge)
    figures.update({f"curves_{safe_name(s.name)}": stage_plot(s) for s in stages})
    for name, fig in figures.items():
        if fig is not None:
            uris[name] = save_png(fig, plots / f"{name}.png")

    # 3. The page, section by section.
    title = str(pipeline.get("name") or run_dir.resolve().name)
    meta = [f"{k}: {pipeline[k]}" for k in ("recipe", "algo") if pipeline.get(k)]
    body = [f"<h1>rlhfkit report: {esc(title)}</h1>",
            f"<p class=note>{esc(' · '.join(meta + [str(run_dir)]))}</p>", "<h2>Headline</h2>"]
    body.append(headline_html(ev) if ev else
                "<p class=note>No eval/eval.json yet (the eval stage has not run): the stage sections below "
                "show each stage's own held-out numbers.</p>")
    if "win_rates" in uris:
        body += ["<h2>Win rates</h2>", img(uris["win_rates"], "win rates with 95% intervals; dashed line: 50%")]
    if "reward_vs_kl" in uris or frontier_notes:
        body += ["<h2>Reward vs KL</h2>",
                 "<p class=note>Training panels: the RL stage's rollouts per step (reward-model score, and gold where "
                 "logged) against its KL to the reference; colour is the step. Eval panel: each model on the held-out prompts, "
                 "judge score against KL to SFT. A reward model score that keeps rising while gold flattens is "
                 "reward over-optimisation.</p>"]
        body += [img(uris["reward_vs_kl"], "reward vs KL")] if "reward_vs_kl" in uris else []
        body += [f"<p class=note>{esc(n)}</p>" for n in frontier_notes]
    body.append("<h2>Training curves</h2>")
    for s in stages:
        if not s.rows:  # labels, eval: not training stages, nothing over steps
            continue
        body += [f"<h3>{esc(s.name)} <span class=note>({esc(s.kind)}{esc(', ' + s.status) if s.status else ''}, "
                 f"{len({r['step'] for r in s.rows})} logged steps)</span></h3>", final_html(s)]
        key = f"curves_{safe_name(s.name)}"
        body.append(img(uris[key], f"{s.name} curves") if key in uris else "<p class=note>No plottable metrics.</p>")
    if ev:
        body += ["<h2>Sample responses</h2>", samples_html(ev)]
    body += ["<h2>Stage wall times</h2>", times_html(stages)]
    page = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{esc(title)} · rlhfkit report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

    # 4. Atomically: a reader (or a browser reload) never sees half a page.
    out = Path(out) if out is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
