"""Shared machinery of the rlhfkit-vs-TRL training benchmarks (bench/sft.py, rm.py, dpo.py, grpo.py).

One invocation of a benchmark script is the *parent*: it makes a temp folder, writes the model
(the built-in tiny model is saved as a Hugging Face folder so TRL can load it) and the built-in
task world's data files into it, then runs each side back to back in its own subprocess

    python bench/<stage>.py ... --side ours --workdir TMP    # rlhfkit
    python bench/<stage>.py ... --side trl  --workdir TMP    # TRL

so each side's peak memory (ru_maxrss; on CUDA also torch.cuda.max_memory_allocated) is its own.
Each child writes TMP/result-<side>.json; the parent prints one table with both sides and the
ratio ours/TRL, then the configuration differences it could not remove, and exits non-zero when
a side failed.

Timing is the same on both sides: a timestamp at the start and at the end of every optimizer
step (rlhfkit: a timer in ``rlhfkit.train.loop.STEP_TIMERS``, told by every stage's loop; TRL: a
``TrainerCallback``'s ``on_step_begin`` / ``on_step_end``; on CUDA after a synchronize). The
headline throughput is the steady state: (N - 1) steps' work over the time from the end of step
1 to the end of step N, so one-time costs (the first step's allocations, lazy initialisation) do
not count. Setup (imports excluded: from just before the side builds its trainer to its first
step) and the first step are reported separately. Logging stays on (every step on both sides,
for the per-step losses); evaluation and checkpointing are off (rlhfkit's unavoidable final
checkpoint and model folder are written after the last timed step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
SIDES = ("ours", "trl")
SIDE_NAMES = {"ours": "rlhfkit", "trl": "TRL"}

# Differences every stage shares; each script adds its own.
COMMON_DIFFERENCES = [
    "Same model folder, same records in the same order (TRL gets rlhfkit's data order and a sequential sampler), "
    "same micro batch / accumulation / steps, same seed.",
    "Optimizer and schedule: TRL is handed the very AdamW (torch, fused, betas 0.9/0.999, eps 1e-8) and LambdaLR "
    "schedule rlhfkit builds (HF's own warmup would start at lr 0, rlhfkit's at lr/(warmup+1)); weight decay "
    "then covers every parameter on both sides. Grad clipping: same max norm.",
    "Precision: fp32 weights on both sides; bf16 = autocast (rlhfkit's --model.precision bf16, TRL's bf16=True).",
    "TRL's default gradient checkpointing is turned off (rlhfkit has none); dropout is off on both sides.",
    "Attention: rlhfkit trains with eager attention on CPU (measured faster there) and packs sequences "
    "(no padding) where the model gives the same numbers packed; TRL keeps transformers' default (sdpa) and "
    "right-pads. On CUDA both use sdpa.",
    "Text: TRL gets the prompt rendered by the same chat template as text plus the response text and the "
    "end-of-turn token (a non-conversational dataset), so both sides see the same token ids (checked; "
    "mismatches are reported). A conversational dataset would make TRL also train on the template's newline "
    "after <|im_end|>.",
    "Output: TRL saves nothing (save_strategy='no'); rlhfkit writes its model folder "
    "after the last timed step (it cannot be turned off). Both log every step.",
]


# --- arguments ----------------------------------------------------------------------------------


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the None ones (those helps say what the default is)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def base_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0], formatter_class=_Help)
    parser.add_argument("--model", default="tiny",
                        help="`tiny` (built-in, saved as a HF folder for both sides), `smollm2-135m-instruct`, or a "
                             "local Hugging Face folder")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps on each side")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides train")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of both sides (data order, init, sampling)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the stage's own)")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: the stage's own)")
    parser.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=None,
                        help="decay after warmup (default: the stage's own)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="run only these sides (the table then has no ratio)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per side before it is killed")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (data, logs, outputs)")
    parser.add_argument("--verbose", action="store_true", help="stream each side's output instead of logging it")
    parser.add_argument("--json", default=None, help="also write both results and the ratios to this JSON file")
    # Internal: set by the parent for its children.
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return parser


def finish_args(args: argparse.Namespace, defaults: dict[str, Any]) -> argparse.Namespace:
    """Fill stage defaults (lr, warmup, schedule) and the device's default precision."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    return args


# --- the model and the data ---------------------------------------------------------------------


def materialise_model(name: str, work: Path) -> str:
    """A Hugging Face folder both sides load: the tiny built-in model is written to WORK/model."""
    from rlhfkit.models import TINY, resolve

    if name == TINY:
        from rlhfkit.models import build_tiny_model, build_tiny_tokenizer

        folder = work / "model"
        tok = build_tiny_tokenizer()
        model = build_tiny_model(tok)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return str(folder)
    path = resolve(name)
    if not Path(path, "config.json").exists():
        raise SystemExit(f"--model {name}: not a built-in name or a local model folder (no config.json)")
    return str(path)


def export_world(work: Path, n_train: int, seed: int = 0, k: int = 4) -> dict[str, Path]:
    """The built-in task world as data files (what `rlhfkit world export` writes): sft.jsonl,
    prompts.jsonl, comparisons.jsonl, rankings.jsonl under WORK/data."""
    from rlhfkit.data.world import Labeler, World, export

    return export(World(seed=seed), work / "data", n_train, 0, k=k, labeler=Labeler(seed=seed), seed=seed)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def nonempty_pair(row: dict) -> bool:
    """False for an exported comparison with an empty response: the world's candidates include
    the empty answer, which `rlhfkit world export` writes but rlhfkit's reader rejects."""
    def text(side):
        value = row[side]
        return value[-1]["content"] if isinstance(value, list) else value

    return bool(text("chosen").strip()) and bool(text("rejected").strip())


def comparisons_file(work: Path, needed: int, seed: int) -> Path:
    """Exactly ``needed`` world comparisons (one epoch of the run), in `rlhfkit world export`'s
    format ({prompt, chosen, rejected} as messages), at WORK/data/pairs.jsonl."""
    paths = export_world(work, needed // 3 + 16, seed=seed)
    rows = [r for r in read_jsonl(paths["comparisons"]) if nonempty_pair(r)]
    if len(rows) < needed:
        raise SystemExit(f"the world export gave {len(rows)} usable comparisons, {needed} needed")
    return write_jsonl(work / "data" / "pairs.jsonl", rows[:needed])


def step_order(n_examples: int, steps: int, global_batch: int, seed: int) -> list[list[int]]:
    """The example indices rlhfkit's training loop uses at each step (its DataOrder), so TRL can be
    given the same examples in the same order."""
    from rlhfkit.train.loop import DataOrder

    order = DataOrder(n_examples, seed)
    return [order.batch(step, global_batch) for step in range(steps)]


# --- timing, memory, results (children) ---------------------------------------------------------


class Recorder:
    """Wall-clock timestamps of each optimizer step's start and end, and of the side's start."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.begin: dict[int, float] = {}
        self.end: dict[int, float] = {}
        self.marks: dict[str, float] = {}
        self.t0 = self.now()

    def start(self) -> None:
        """Restart the setup clock: each side calls this once its libraries are imported (and
        notes the memory those imports took, to tell it apart from training memory)."""
        self.t0 = self.now()
        self.marks["rss_after_imports_mib"] = peak_memory()["peak_rss_mib"]

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def step_begin(self, step: int) -> None:
        self.begin.setdefault(step, self.now())

    def step_end(self, step: int) -> None:
        self.end[step] = self.now()

    def mark(self, name: str, seconds: float) -> None:
        self.marks[name] = self.marks.get(name, 0.0) + seconds


def install_rlhfkit_timer(rec: Recorder) -> None:
    """Timestamps around every rlhfkit optimizer step: each stage's loop starts a step with
    ``run.step_batches(step)`` and ends it with ``run.end_step(done, ...)`` (before logging,
    evaluation and checkpointing); both tell the timers in ``STEP_TIMERS``."""
    from rlhfkit.train import loop

    loop.STEP_TIMERS.append(rec)


def trl_recorder(rec: Recorder):
    """A TrainerCallback recording step times and every logged dict (loss, reward ...) by step."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.logs: dict[int, dict] = {}

        def on_step_begin(self, args, state, control, **kwargs):
            rec.step_begin(state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            rec.step_end(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.setdefault(state.global_step, {}).update(logs or {})

    return StepRecorder()


def rlhfkit_metrics(out: Path) -> dict[int, dict]:
    """metrics.jsonl of an rlhfkit run, by step."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return {}
    return {row["step"]: row for row in read_jsonl(path)}


def peak_memory() -> dict[str, float | None]:
    """This process's peak resident memory in MiB (Linux reports KiB) and, on CUDA, the peak
    memory torch allocated."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 1024 if sys.platform != "darwin" else rss / 2**20
    cuda_mib = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_mib = torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # noqa: BLE001  (memory is reported, never fatal)
        pass
    return {"peak_rss_mib": rss_mib, "peak_cuda_mib": cuda_mib}


def trl_training_kwargs(args: argparse.Namespace, out: Path, micro_batch: int, grad_accum: int) -> dict[str, Any]:
    """TrainingArguments shared by every TRL trainer here: the same steps, batches, clipping,
    precision and seed as rlhfkit; no evaluation, no saving, no reporting, no progress bar;
    gradient checkpointing off; examples in the order given."""
    return dict(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        logging_steps=1,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16",
        fp16=False,
        **checkpointing_off(),
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        skip_memory_metrics=True,
    )


def checkpointing_off() -> dict[str, bool]:
    """TRL turns gradient checkpointing on by default; transformers >= 5.23 names the field
    `activation_checkpointing` (the old name still works, with a FutureWarning)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: False}


def trl_optimizer(model, args: argparse.Namespace):
    """rlhfkit's own AdamW and LambdaLR schedule, handed to TRL through ``optimizers=``."""
    from rlhfkit.config import OptimConfig
    from rlhfkit.train.loop import build_optimizer, build_scheduler

    optim = OptimConfig(lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                        warmup_steps=args.warmup, max_grad_norm=args.max_grad_norm)
    optimizer = build_optimizer(model.parameters(), optim)
    return optimizer, build_scheduler(optimizer, optim, args.steps)


def quiet_trainer(trainer) -> None:
    """Drop the callback that prints every log dict to stdout (the recorder keeps them)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


def optim_flags(args: argparse.Namespace) -> list[str]:
    """rlhfkit flags for the optimizer, schedule, steps and seed."""
    return ["--optim.lr", repr(args.lr), "--optim.warmup-steps", str(args.warmup), "--optim.schedule", args.schedule,
            "--optim.weight-decay", repr(args.weight_decay), "--optim.max-grad-norm", repr(args.max_grad_norm),
            "--model.precision", args.precision, "--run.steps", str(args.steps), "--run.seed", str(args.seed),
            "--run.save-every", str(args.steps), "--run.eval-every", "0", "--run.log-every", "1",
            "--run.overwrite"]


def load_trl_policy(path: str, tok, device: str):
    """The causal LM as a TRL user loads it (from_pretrained, fp32, transformers' default attention),
    with the pad token rlhfkit's loader gives it (SmolLM2's config says pad = EOS) and dropout off."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhfkit.models import disable_dropout

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    disable_dropout(model)
    return model.to(device)


def load_tokenizer(path: str):
    """The tokenizer both sides use (rlhfkit's loader: a pad token distinct from EOS)."""
    from rlhfkit.models import load_tokenizer as _load

    return _load(path)


# --- rewards for GRPO (plain Python functions of the completion text) ---------------------------


def length_score(text: str, target: int = 40) -> float:
    """-|characters - target| / target: a reward that varies within almost every group."""
    return -abs(len(text) - target) / target


def length_reward(prompts: list, responses: list[str]) -> list[float]:
    """rlhfkit's `--reward module:function` form: (prompts as message dicts, responses)."""
    return [length_score(r) for r in responses]


# --- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a label, each side's value, and how to show and compare them."""

    label: str
    key: str
    fmt: str = "{:.4g}"
    ratio: bool = True  # show ours / TRL


@dataclass
class Stage:
    """What a benchmark script plugs into ``main``."""

    name: str
    doc: str
    unit: str  # what the throughput counts: samples, pairs, completions
    add_args: Callable[[argparse.ArgumentParser], None]
    defaults: dict[str, Any]
    # Parent: (args, workdir, model folder) -> the spec both children read (data paths ...).
    prepare: Callable[[argparse.Namespace, Path, str], dict]
    run_ours: Callable[[argparse.Namespace, Path, dict, Recorder], dict]
    run_trl: Callable[[argparse.Namespace, Path, dict, Recorder], dict]
    units_per_step: Callable[[argparse.Namespace], int]
    differences: Callable[[argparse.Namespace], list[str]]
    loss_key: str = "loss"  # per-step value compared at step 1 and N ("loss" or "reward")
    extra_rows: list[Row] = field(default_factory=list)


def summarise(result: dict, units_per_step: int, spec: dict) -> dict:
    """Throughput and per-step times from a child's timestamps."""
    begin = {int(k): v for k, v in result["begin"].items()}
    end = {int(k): v for k, v in result["end"].items()}
    steps = sorted(end)
    out = dict(result)
    if not steps:
        return out
    n, first, last = len(steps), steps[0], steps[-1]
    first_step_s = end[first] - begin.get(first, result["t0"])
    steady_s = (end[last] - end[first]) / (n - 1) if n > 1 else first_step_s
    out.update({
        "steps_timed": n,
        "setup_s": begin.get(first, end[first]) - result["t0"],
        "first_step_s": first_step_s,
        "step_s": steady_s,
        "throughput": units_per_step / steady_s if steady_s > 0 else float("nan"),
        "total_s": end[last] - result["t0"],
    })
    reference_s = result.get("marks", {}).get("reference_s", 0.0)
    # Whole run: all N steps (step 1's one-time costs included) plus a reference pass done before
    # training (rlhfkit's DPO), whose first forward pays the one-time costs TRL pays in step 1.
    whole_s = end[last] - begin.get(first, result["t0"]) + reference_s
    out["throughput_incl_reference"] = units_per_step * n / whole_s if whole_s > 0 else float("nan")
    out["setup_s"] -= reference_s
    out["reference_s"] = reference_s
    imports = result.get("marks", {}).get("rss_after_imports_mib")
    if imports is not None:
        out["rss_after_imports_mib"] = imports
        out["peak_rss_training_mib"] = result["peak_rss_mib"] - imports
    # Tokens per step over the steady window: SFT's prompt + response tokens (from the data, the same
    # on both sides), GRPO's generated tokens (each side's own samples).
    tokens = result.get("tokens_per_step") or spec.get("tokens_per_step")
    if tokens:
        out["tokens_per_s"] = tokens / steady_s if steady_s > 0 else float("nan")
    return out


def table(stage: Stage, args: argparse.Namespace, results: dict[str, dict]) -> dict[str, float]:
    from rich.console import Console
    from rich.table import Table

    unit, key = stage.unit, stage.loss_key
    rows = [Row(f"{unit}/s (steady, steps 2..N)", "throughput", "{:.2f}")]
    if stage.name == "dpo":
        rows.append(Row(f"{unit}/s, steps 1..N + reference pass", "throughput_incl_reference", "{:.2f}"))
        rows.append(Row("reference pass before training (s)", "reference_s", "{:.2f}", ratio=False))
    rows += stage.extra_rows
    rows += [
        Row("step time (s, steady)", "step_s", "{:.3f}"),
        Row("first step (s)", "first_step_s", "{:.3f}"),
        Row("setup before step 1 (s; no imports, no reference pass)", "setup_s", "{:.2f}"),
        Row(f"{key} at step 1", f"{key}_first", "{:.5f}", ratio=key == "loss"),
        Row(f"{key} at step {args.steps}", f"{key}_last", "{:.5f}", ratio=key == "loss"),
        Row("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
        Row("  of which after imports (MiB)", "rss_after_imports_mib", "{:.0f}"),
        Row("  peak RSS - after imports (MiB)", "peak_rss_training_mib", "{:.0f}"),
    ]
    if args.device == "cuda":
        rows.append(Row("peak CUDA allocated (MiB)", "peak_cuda_mib", "{:.0f}"))
    if any("token_mismatches" in r for r in results.values()):
        rows.append(Row("examples whose tokens differ from rlhfkit's", "token_mismatches", "{:.0f}", ratio=False))

    t = Table(title=f"{stage.name}: {args.model}, {args.device}, {args.precision}, {args.steps} steps, "
                    f"{stage.units_per_step(args)} {unit}/step")
    t.add_column("metric")
    for side in SIDES:
        if side in results:
            t.add_column(SIDE_NAMES[side], justify="right")
    both = all(results.get(s, {}).get("ok") for s in SIDES)
    if both:
        t.add_column("ours/TRL", justify="right")
    ratios: dict[str, float] = {}
    for row in rows:
        values = [results[s].get(row.key) for s in SIDES if s in results]
        if all(v is None for v in values):
            continue
        cells = [row.label] + ["—" if v is None else row.fmt.format(v) for v in values]
        if both:
            a, b = results["ours"].get(row.key), results["trl"].get(row.key)
            if row.ratio and isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                ratios[row.key] = a / b
                cells.append(f"{a / b:.2f}x")
            else:
                cells.append("")
        t.add_row(*cells)
    console = Console(width=max(100, shutil.get_terminal_size((120, 20)).columns))
    console.print(t)
    return ratios


def agreement_note(stage: Stage, args: argparse.Namespace, results: dict[str, dict]) -> str | None:
    """Same data and same initial weights: the first step's loss must agree (GRPO samples differ)."""
    if stage.loss_key != "loss" or not all(results.get(s, {}).get("ok") for s in SIDES):
        return None
    a, b = results["ours"].get("loss_first"), results["trl"].get("loss_first")
    if a is None or b is None:
        return "step-1 loss missing on one side"
    rel = abs(a - b) / max(abs(b), 1e-12)
    tolerance = 2e-3 if args.precision == "fp32" else 2e-2
    verdict = "agree" if rel <= tolerance else "DISAGREE (check the token and data notes)"
    return (f"step-1 loss: ours {a:.6f}, TRL {b:.6f}, relative difference {rel:.2e} -> {verdict} "
            f"(tolerance {tolerance:g})")


# --- the parent and the children ------------------------------------------------------------------


def run_child(script: Path, args: argparse.Namespace, side: str, work: Path) -> tuple[int, Path]:
    argv = [sys.executable, str(script), *sys.argv[1:], "--side", side, "--workdir", str(work)]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # rlhfkit picks CUDA whenever it is visible
    log = work / f"{side}.log"
    with open(log, "w") as f:
        try:
            proc = subprocess.run(argv, env=env, stdout=None if args.verbose else f,
                                  stderr=subprocess.STDOUT if not args.verbose else None, timeout=args.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[bench] killed after {args.timeout} s\n")
            code = 124
    return code, log


def child(stage: Stage, args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    spec = json.loads((work / "spec.json").read_text())
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device")
    import torch

    rec = Recorder(cuda=args.device == "cuda")
    if args.side == "ours":
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        install_rlhfkit_timer(rec)
        extra = stage.run_ours(args, work, spec, rec)
    else:
        import datasets

        datasets.disable_progress_bars()
        extra = stage.run_trl(args, work, spec, rec)
    result = {"side": args.side, "ok": True, "t0": rec.t0, "begin": rec.begin, "end": rec.end, "marks": rec.marks,
              "threads": torch.get_num_threads(), **peak_memory(), **extra}
    (work / f"result-{args.side}.json").write_text(json.dumps(result))


def main(stage: Stage) -> None:
    parser = base_parser(stage.doc)
    stage.add_args(parser)
    args = finish_args(parser.parse_args(), stage.defaults)
    if args.side:
        child(stage, args)
        return

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    script = Path(sys.argv[0]).resolve()
    work = Path(tempfile.mkdtemp(prefix=f"rlhfkit-bench-{stage.name}-"))
    failed: list[str] = []
    results: dict[str, dict] = {}
    try:
        t = time.perf_counter()
        model_path = materialise_model(args.model, work)
        spec = {"model": model_path, **stage.prepare(args, work, model_path)}
        (work / "spec.json").write_text(json.dumps(spec))
        print(f"[bench] {stage.name}: model {model_path}; data in {work} ({time.perf_counter() - t:.1f} s)", flush=True)
        for side in args.sides:
            print(f"[bench] running {SIDE_NAMES[side]} ...", flush=True)
            t = time.perf_counter()
            code, log = run_child(script, args, side, work)
            result_path = work / f"result-{side}.json"
            if code != 0 or not result_path.exists():
                failed.append(side)
                tail = log.read_text()[-4000:] if log.exists() else ""
                print(f"[bench] {SIDE_NAMES[side]} FAILED (exit {code}); last output:\n{tail}", file=sys.stderr)
                results[side] = {"ok": False}
                continue
            results[side] = summarise(json.loads(result_path.read_text()), stage.units_per_step(args), spec)
            print(f"[bench] {SIDE_NAMES[side]} done in {time.perf_counter() - t:.1f} s "
                  f"({results[side].get('threads')} torch threads)", flush=True)
        ratios = table(stage, args, results) if any(r.get("ok") for r in results.values()) else {}
        note = agreement_note(stage, args, results)
        if note:
            print(note)
        if any(r.get("ok") for r in results.values()):
            print("differences that remain:")
            for line in COMMON_DIFFERENCES + stage.differences(args):
                print(f"  - {line}")
        for side, r in results.items():
            for warning in r.get("warnings", []):
                print(f"  ! {SIDE_NAMES[side]}: {warning}")
        if args.json:
            Path(args.json).write_text(json.dumps({"stage": stage.name, "args": vars(args), "results": results,
                                                   "ratios": ratios}, indent=2, default=str))
    finally:
        if args.keep:
            print(f"[bench] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit(1)


def per_step(logs: dict[int, dict], key: str, steps: int) -> tuple[float | None, float | None]:
    """(value at step 1, value at the last step) of a per-step logged key."""
    first = logs.get(1, {}).get(key)
    last = logs.get(steps, {}).get(key)
    return first, last
