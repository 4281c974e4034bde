"""`rlhfkit <command>`: parse a stage config (recipe defaults + flags) and call the stage.

Thin on purpose: every command is a dataclass config (its fields are the flags, documented in
`--help`) and a function that takes it.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from rlhfkit import processes
from rlhfkit.config import from_dict, load_recipe_section, require_finite
from rlhfkit.errors import ConfigError, RlhfkitError


@dataclass
class WorldExportConfig:
    """Write the built-in task world as data files in the formats users bring."""

    out: str = "world_data"
    """Folder for sft.jsonl, prompts.jsonl, eval_prompts.jsonl, comparisons.jsonl, rankings.jsonl."""
    n_train: int = 2000
    """Training prompts (each gives a demonstration, a ranking and its comparisons)."""
    n_eval: int = 200
    """Held-out prompts (the world's eval split)."""
    k: int = 4
    """Completions per ranking."""
    seed: int = 0
    """World seed (prompt generation) and labeler seed."""
    temperature: float = 0.05
    """Simulated labelers' Bradley-Terry noise temperature on gold scores (0 = noiseless)."""


def world_export(cfg: WorldExportConfig) -> None:
    from pathlib import Path

    from rlhfkit.data.world import Labeler, World, export

    paths = export(World(seed=cfg.seed), Path(cfg.out), cfg.n_train, cfg.n_eval, k=cfg.k,
                   labeler=Labeler(temperature=cfg.temperature, seed=cfg.seed), seed=cfg.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


@dataclass
class RMScoreConfig:
    """Score a file of {prompt, response} records with a trained reward model."""

    model: str
    """Reward model folder (the output of `rlhfkit rm`)."""
    input: str
    """JSONL/JSON/Parquet file of records with `prompt` (text or messages) and `response`."""
    out: str = "scores.jsonl"
    """Output JSONL: the input rows with a `reward` field (normalised: reference responses average 0)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    max_seq_len: int = 512
    """Longer inputs lose their oldest context."""


def rm_score(cfg: RMScoreConfig) -> None:
    from rlhfkit.reward import score_file

    n = score_file(cfg.model, cfg.input, cfg.out, cfg.batch_size, cfg.max_seq_len)
    print(f"scored {n} records -> {cfg.out}")


# name -> (config class or "module:Class", "module:function", recipe section or None, help line).
# Commands whose config lives in their own module name it as a string: imported only when used.
COMMANDS: dict[str, tuple[type | str, str, str | None, str]] = {
    "run": ("rlhfkit.pipeline:PipelineConfig", "rlhfkit.pipeline:run", None,
            "the whole pipeline: SFT -> labels -> RM -> PPO (or DPO, online DPO, GRPO) -> eval -> report"),
    "sft": ("rlhfkit.train.sft:SFTConfig", "rlhfkit.train.sft:train", "sft", "supervised fine-tuning on demonstrations"),
    "rm": ("rlhfkit.train.rm:RMConfig", "rlhfkit.train.rm:train", "rm", "reward model from comparisons and K-wise rankings"),
    "rm score": (RMScoreConfig, "rlhfkit.cli:rm_score", None, "score prompt/response records with a reward model"),
    "ppo": ("rlhfkit.train.ppo:PPOConfig", "rlhfkit.train.ppo:train", "ppo", "PPO against a reward model with a per-token KL penalty"),
    "dpo": ("rlhfkit.train.dpo:DPOConfig", "rlhfkit.train.dpo:train", "dpo", "DPO (or IPO, cDPO, SimPO) on comparisons and rankings"),
    "online-dpo": ("rlhfkit.train.online_dpo:OnlineDPOConfig", "rlhfkit.train.online_dpo:train", "online-dpo",
                   "online iterative DPO: sample N, rank with the reward, best vs worst, DPO, repeat"),
    "grpo": ("rlhfkit.train.grpo:GRPOConfig", "rlhfkit.train.grpo:train", "grpo", "GRPO / RLOO: group-baseline policy gradient against a reward"),
    "bon": ("rlhfkit.eval.bon:BestOfNConfig", "rlhfkit.eval.bon:best_of_n", None, "best-of-N sampling with a reward (a baseline, or SFT data)"),
    "eval": ("rlhfkit.eval.evaluate:EvalConfig", "rlhfkit.eval.evaluate:evaluate", None,
             "win rate of one model against another under a judge (gold, reward model, LLM), both orders"),
    "report": ("rlhfkit.eval.report:ReportConfig", "rlhfkit.eval.report:report", None,
               "one self-contained HTML report (plots, win rates, sample responses) for a run folder"),
    "chat": ("rlhfkit.serve.chat:ChatConfig", "rlhfkit.serve.chat:chat", None, "streaming terminal chat with a model"),
    "sample": ("rlhfkit.serve.sample:SampleConfig", "rlhfkit.serve.sample:sample", None,
               "batch generation: answer a file of prompts, write JSONL"),
    "serve": ("rlhfkit.serve.api:ServeConfig", "rlhfkit.serve.api:serve", None,
              "OpenAI-compatible API (/v1/chat/completions, streaming) and a chat page"),
    "label serve": ("rlhfkit.label.cli:LabelServeConfig", "rlhfkit.label.cli:serve", None,
                    "the labelling web app: people rank K responses per prompt, flag, write better answers"),
    "label add-labeller": ("rlhfkit.label.cli:AddLabellerConfig", "rlhfkit.label.cli:add_labeller", None,
                           "create a labeller and print their sign-in token"),
    "label export": ("rlhfkit.label.cli:LabelExportConfig", "rlhfkit.label.cli:export", None,
                     "write collected labels as rankings/comparisons/demonstrations JSONL for rm, dpo, sft"),
    "world export": (WorldExportConfig, "rlhfkit.cli:world_export", None, "write the built-in task world as data files"),
}


# Commands with no share of work for several processes: servers (one port, many users), chat, and
# file tools. Under torchrun each process would run the whole command.
ONE_PROCESS = {"rm score", "report", "chat", "sample", "serve", "label serve", "label add-labeller", "label export",
               "world export"}


def version() -> str:
    """The installed package's version (pyproject.toml's), so a bug report can name the code it ran."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("rlhfkit")
    except PackageNotFoundError:  # source tree on PYTHONPATH, never pip-installed
        return "(not installed: run `pip install -e .`)"


def usage() -> str:
    lines = ["usage: rlhfkit <command> [--help] [flags]", "       rlhfkit --version", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    lines += [f"  {name:<{width}}  {entry[3]}" for name, entry in COMMANDS.items()]
    return "\n".join(lines)


def split_recipe(args: list[str]) -> tuple[str, list[str]]:
    """Pull `--recipe NAME` out of the flags: it chooses the defaults the other flags override."""
    rest, recipe, i = [], "", 0
    while i < len(args):
        if args[i] == "--recipe" and i + 1 < len(args):
            recipe, i = args[i + 1], i + 2
        elif args[i].startswith("--recipe="):
            recipe, i = args[i].split("=", 1)[1], i + 1
        else:
            rest.append(args[i])
            i += 1
    return recipe, rest


def parse(name: str, args: list[str]) -> Any:
    import tyro

    cls, _, section, help_line = COMMANDS[name]
    if isinstance(cls, str):
        cls = resolve_function(cls)
    default = None
    if section is not None:
        recipe, args = split_recipe(args)
        if recipe:
            default = from_dict(cls, {**load_recipe_section(recipe, section), "recipe": recipe}, f"recipe {recipe}: {section}")
    cfg = tyro.cli(cls, default=default, args=args, prog=f"rlhfkit {name}", description=help_line)
    require_finite(cfg)
    return cfg


def require_model(name: str, args: list[str]) -> None:
    """A stage command names its model, by flag or recipe: the field's default, the random
    1M-parameter `tiny`, silently trained a TRL user's `rlhfkit dpo --data.train prefs.jsonl`."""
    recipe, flags = split_recipe(args)
    if COMMANDS[name][2] is None or recipe or any(a in ("-h", "--help") for a in flags):
        return
    if not any(a == "--model.name" or a.startswith("--model.name=") for a in flags):
        raise ConfigError(
            "say which model to train: --model.name smollm2-135m-instruct (built in), a local folder or a hub id "
            "(--model.name tiny: the random 1M-parameter test model); or --recipe smollm2, tiny or hh for a whole setup")


def announce_data(cfg: Any, args: list[str]) -> None:
    """Say so when a stage command trains on the built-in task world because no data was named."""
    from rlhfkit.data.sources import is_world

    data = getattr(cfg, "data", None)
    if is_world(getattr(data, "train", None)) and not split_recipe(args)[0]:
        print("data: the built-in task world (--data.train FILE for your own)", file=sys.stderr)


def resolve_function(spec: str) -> Callable[[Any], Any]:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        print(f"rlhfkit {version()}")
        return
    name = argv[0]
    if " ".join(argv[:2]) in COMMANDS:  # two-word commands (`rm score`) before one-word ones
        name, argv = " ".join(argv[:2]), argv[1:]
    if name not in COMMANDS:
        print(f"rlhfkit: unknown command '{argv[0]}'\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    # Our own progress bar reports the work; transformers' per-load/per-save bars are noise here.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        if name in ONE_PROCESS and processes.distributed():
            raise RlhfkitError(f"`rlhfkit {name}` runs in one process: launch it without torchrun or accelerate launch "
                               "(the training stages, `run`, `bon` and `eval` split their work across processes)")
        require_model(name, argv[1:])
        cfg = parse(name, argv[1:])
        if COMMANDS[name][2] is not None:
            announce_data(cfg, argv[1:])
        resolve_function(COMMANDS[name][1])(cfg)
        processes.close()
    except RlhfkitError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch: said once
            print(f"rlhfkit {name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        hint = {"run": "; rerun the same command to continue"}.get(name, "")
        if COMMANDS[name][2] is not None:  # a training stage: it checkpoints
            hint = "; rerun with --run.resume to continue from the last checkpoint"
        print(f"rlhfkit {name}: interrupted{hint}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
