"""`rlhfkit run [RECIPE]`: the whole recipe as one job, stage after stage.

    sft -> labels -> rm -> ppo | dpo | online_dpo | grpo -> eval -> report.html

Each stage is the same function its own command calls (`rlhfkit sft`, `rlhfkit rm` ...), with
its config taken from the recipe's section and its inputs pointed at the earlier stages' folders
under ``runs/<name>/``. Stages talk only through those folders. A finished stage holds
``complete.json`` and is skipped on a rerun; an interrupted one resumes from its last checkpoint.
A finished stage's resume checkpoints are deleted (`pipeline.keep_checkpoints: true` keeps them):
nothing reads them once the stage is complete, and a PPO checkpoint (policy, value model and both
optimizers' state) is ~3 GB.
``pipeline.json`` records what ran and how long it took; the report reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import tyro
import yaml

from rlhfkit import processes
from rlhfkit.config import from_dict, recipe_path, save_config, to_dict
from rlhfkit.data.sources import WORLD, is_world
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.runs import COMPLETE, config_differences, mark_complete
from rlhfkit.train.dpo import DPOConfig
from rlhfkit.train.grpo import GRPOConfig
from rlhfkit.train.online_dpo import OnlineDPOConfig
from rlhfkit.train.ppo import PPOConfig
from rlhfkit.train.rm import RMConfig
from rlhfkit.train.sft import SFTConfig

ALGOS = ("ppo", "dpo", "online-dpo", "grpo")
PIPELINE_KEYS = ("algo", "stage_eval", "keep_checkpoints")
# algo -> (config class, "module:function", recipe section, stage folder)
RL_STAGES: dict[str, tuple[type, str, str, str]] = {
    "ppo": (PPOConfig, "rlhfkit.train.ppo:train", "ppo", "ppo"),
    "dpo": (DPOConfig, "rlhfkit.train.dpo:train", "dpo", "dpo"),
    "online-dpo": (OnlineDPOConfig, "rlhfkit.train.online_dpo:train", "online-dpo", "online_dpo"),
    "grpo": (GRPOConfig, "rlhfkit.train.grpo:train", "grpo", "grpo"),
}


@dataclass
class PipelineConfig:
    """Run SFT -> labels -> reward model -> RL -> evaluation -> report, skipping finished stages."""

    recipe: tyro.conf.Positional[str] = "smollm2"
    """`smollm2` (the real model on the built-in world; the default), `tiny` (a few minutes), `hh`
    (Anthropic hh-rlhf from ../shared), or a YAML path with the same sections."""
    algo: Literal["", "ppo", "dpo", "online-dpo", "grpo"] = ""
    """The preference-learning stage. Empty: the recipe's `pipeline.algo` (PPO for smollm2 and tiny)."""
    labels: str = "simulated"
    """Where the preference labels come from: `simulated` (the world's simulated labelers rank K
    samples of the SFT model), `human` (the labelling app's database, `--labels-db`: the run stops
    after SFT with instructions until it holds rankings), or a rankings/comparisons file."""
    labels_db: str = "labels.db"
    """With `--labels human`: the labelling app's database (a SQLite file or an SQLAlchemy URL)."""
    name: str = ""
    """Run name: the folder `runs_dir/name`. Empty: the recipe name, plus the algo when it is not the default."""
    runs_dir: str = "runs"
    """Parent folder of runs."""
    set: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """Recipe overrides, `SECTION.KEY=VALUE` (e.g. `ppo.run.steps=10`, `eval.prompts=64`); repeatable.
    Values are read as YAML. Changing a finished stage's settings needs --overwrite."""
    overwrite: bool = False
    """Delete the run folder and start again instead of continuing it."""


@dataclass
class EvalStageConfig:
    """The pipeline's final evaluation (recipe section `eval:`): base vs SFT vs RL on held-out prompts."""

    prompts: int = 128
    """Held-out prompts (the world's eval split, or a data file's held-out share)."""
    held_out_fraction: float = 0.15
    """A data file's held-out share, by prompt hash: keep it equal to the stages' `eval_fraction`."""
    max_new_tokens: int = 48
    """Generation length limit."""
    batch_size: int = 32
    """Prompts per generation batch."""
    temperature: float = 1.0
    """Sampling temperature for the sampled win rates and the KL estimate (1 = the policy itself)."""
    report_samples: int = 8
    """Prompts whose answers (base / SFT / RL) the report shows side by side."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` (default): bf16 autocast where it measures clearly faster for this model on this machine, else fp32 (measured once, cached). `bf16`: forward passes under bf16 autocast, weights stay fp32. `fp32`."""
    seed: int = 0
    """Sampling seed (the same for every model, so differences come from the models)."""


# --- recipe -> stage configs ------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """`ppo.run.steps=10` -> {"ppo": {"run": {"steps": 10}}}, values read as YAML."""
    tree: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. ppo.run.steps=10")
        node = tree.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(error).splitlines()[0]}); "
                              f"quote it, e.g. --set '{key}=\"{raw}\"'") from None
    return tree


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


@dataclass
class Plan:
    """Where each stage writes and what it reads, resolved once from the recipe and flags."""

    cfg: PipelineConfig
    algo: str
    root: Path
    sections: dict[str, dict]  # recipe sections merged with --set overrides

    def section(self, name: str) -> dict:
        return self.sections.get(name, {}) or {}

    def stage_config(self, cls: type, section: str) -> Any:
        return from_dict(cls, {**self.section(section), "recipe": self.cfg.recipe}, f"recipe {self.cfg.recipe}: {section}")

    @property
    def base_model(self) -> str:
        return (self.section("sft").get("model") or {}).get("name", "smollm2-135m-instruct")

    @property
    def world(self) -> bool:
        """Does the recipe run on the built-in world (gold judge, simulated labelers)?"""
        return is_world((self.section("sft").get("data") or {}).get("train", WORLD))


def make_plan(cfg: PipelineConfig) -> Plan:
    path = recipe_path(cfg.recipe)
    recipe = yaml.safe_load(path.read_text()) or {}
    sections = merge(recipe, parse_overrides(cfg.set))
    unknown = set(parse_overrides(cfg.set)) - set(recipe) - {"pipeline", "eval", "sft", "rm", *(s for _, _, s, _ in RL_STAGES.values())}
    if unknown:
        raise ConfigError(f"--set: unknown section(s) {', '.join(sorted(unknown))}")
    extra = set(sections.get("pipeline") or {}) - set(PIPELINE_KEYS)
    if extra:
        raise ConfigError(f"recipe {cfg.recipe}: unknown key(s) {', '.join(sorted(extra))} in `pipeline:` "
                          f"(known: {', '.join(PIPELINE_KEYS)})")
    keep = (sections.get("pipeline") or {}).get("keep_checkpoints", False)
    if not isinstance(keep, bool):
        raise ConfigError(f"recipe {cfg.recipe}: pipeline.keep_checkpoints must be true or false, got {keep!r}")
    default_algo = (sections.get("pipeline") or {}).get("algo", "ppo")
    algo = cfg.algo or default_algo
    if algo not in ALGOS:
        raise ConfigError(f"recipe {cfg.recipe}: pipeline.algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    if RL_STAGES[algo][2] not in sections:
        raise ConfigError(f"recipe {cfg.recipe} ({path}) has no `{RL_STAGES[algo][2]}:` section, so it cannot run --algo {algo}")
    recipe_name = Path(cfg.recipe).stem if cfg.recipe.endswith((".yaml", ".yml")) else cfg.recipe
    name = cfg.name or (recipe_name if algo == default_algo else f"{recipe_name}-{algo}")
    return Plan(cfg, algo, Path(cfg.runs_dir) / name, sections)


def check_settings(plan: Plan) -> None:
    """Every stage's settings, built and checked before the run folder exists: a mistake in the
    recipe or in --set stops the run with nothing written, so the corrected command is not refused."""
    cls = RL_STAGES[plan.algo][0]
    for stage_cls, section in ((SFTConfig, "sft"), (RMConfig, "rm"), (cls, RL_STAGES[plan.algo][2])):
        if section in plan.sections:
            plan.stage_config(stage_cls, section).check()
    from_dict(EvalStageConfig, plan.section("eval"), f"recipe {plan.cfg.recipe}: eval")


# --- the stages ---------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str  # shown to the user
    folder: str  # under the run folder
    kind: str
    run: Callable[[Path], None]  # writes the folder (and complete.json last)
    # The settings that decide what the stage writes into a folder (saved there as config.yaml);
    # None: never shared with another run (see `shared_source`).
    settings: Callable[[Path], dict] | None = None


def train_stage(plan: Plan, name: str, cls: type, target: str, section: str, wire: Callable[[Any], None],
                reads_labels: bool = False) -> Stage:
    """A training stage: the recipe's section, pointed at this run's folders by ``wire``, resumed
    when its folder already holds part of a run."""

    def configure(out: Path) -> Any:
        stage_cfg = plan.stage_config(cls, section)
        wire(stage_cfg)
        stage_cfg.run.out = str(out)
        return stage_cfg

    def go(out: Path) -> None:
        from rlhfkit.cli import resolve_function

        stage_cfg = configure(out)
        if reads_labels and processes.is_main():
            copy_labels(plan, stage_cfg)
        processes.wait_for_everyone()  # every process then sees the folder the same
        stage_cfg.run.resume = out.exists() and any(out.iterdir())
        stage_cfg.run.overwrite = False
        resolve_function(target)(stage_cfg)

    def settings(out: Path) -> dict:
        from rlhfkit.precision import resolve

        stage_cfg = configure(out)
        # auto is decided by the layer shape, the base model's in every stage (their input folders
        # may not exist yet when another run's are compared)
        stage_cfg.model.precision = resolve(stage_cfg.model.precision, plan.base_model, None)
        return to_dict(stage_cfg)

    return Stage(name, RL_STAGES[name][3] if name in RL_STAGES else name, name, go, settings)


def preference_section(plan: Plan) -> str:
    """The section whose `data:` describes the labels: DPO learns from them directly, otherwise the RM does."""
    return "dpo" if plan.algo == "dpo" else "rm"


def labels_stage(plan: Plan) -> Stage:
    """Data collection: K samples per world prompt from the SFT model, ranked by the simulated
    labelers, written as rankings that the RM (or DPO) stage then reads."""

    def configure(out: Path, say: Callable[[str], None] | None) -> Any:
        from rlhfkit.precision import resolve

        section = preference_section(plan)
        stage_cfg = plan.stage_config(DPOConfig if section == "dpo" else RMConfig, section)
        stage_cfg.model.name = str(plan.root / "sft")
        stage_cfg.model.precision = resolve(stage_cfg.model.precision, plan.base_model, say)  # as train_stage
        stage_cfg.data.policy = ""
        return stage_cfg

    def settings(out: Path) -> dict:  # what the rankings depend on: the sampling model, data and seed
        stage_cfg = configure(out, None)
        return {"model": to_dict(stage_cfg.model), "data": to_dict(stage_cfg.data),
                "run": {"seed": stage_cfg.run.seed, "out": str(out)}}

    def go(out: Path) -> None:
        from rlhfkit.rankings import load_rankings
        from rlhfkit.precision import to_stderr

        stage_cfg = configure(out, to_stderr)
        train, held = load_rankings(stage_cfg.data, stage_cfg.model, stage_cfg.run.seed, out)  # every process samples
        if processes.is_main():
            save_config(settings(out), out / "config.yaml")
            mark_complete(out, {"stage": "labels", "train_rankings": len(train), "eval_rankings": len(held),
                                "k": stage_cfg.data.k, "responses": stage_cfg.data.responses, "labeler": "simulated"})

    return Stage("labels", "labels", "labels", go, settings)


def human_labels_stage(plan: Plan) -> Callable[[Path], None]:
    """Human labels: export the labelling app's database into this stage's folder. Until it holds
    rankings, stop with the commands that collect them (a rerun continues here)."""

    def go(out: Path) -> None:
        from rlhfkit.label.export import export
        from rlhfkit.label.store import Store

        db = plan.cfg.labels_db
        if processes.is_main() and ("://" in db or Path(db).expanduser().is_file()):
            meta = export(Store(db), out)
            if meta["exported"]["rankings.jsonl"]:
                mark_complete(out, {"stage": "labels", "labeler": "human", "db": db, **meta["exported"]})
        processes.wait_for_everyone()
        if (out / COMPLETE).exists():
            return
        sft = plan.root / "sft"
        prompts = "world_data/prompts.jsonl" if plan.world else "PROMPTS.jsonl"
        world_note = "  (world prompts: `rlhfkit world export --out world_data`)\n" if plan.world else ""
        raise RlhfkitError(
            f"no human rankings in {db} yet. Collect them on the SFT model's answers, then run this command again:\n"
            f"  rlhfkit label add-labeller NAME --db {db}\n"
            f"  rlhfkit label serve --db {db} --model {sft} --prompts {prompts} --k 4\n{world_note}"
            "The run continues from here; its SFT stage is kept.")

    return go


def wire_preferences(plan: Plan, stage_cfg: Any) -> None:
    """Point an RM or DPO config at this run's labels: the labels stage's rankings (see
    `copy_labels`), the human labels it exported, or the user's labels file."""
    if plan.cfg.labels == "human":
        stage_cfg.data.train = str(plan.root / "labels" / "rankings.jsonl")
        stage_cfg.data.eval = ""  # held out from the file by prompt hash
    elif plan.cfg.labels != "simulated":
        stage_cfg.data.train = plan.cfg.labels


def copy_labels(plan: Plan, stage_cfg: Any) -> None:
    """Simulated labels on the world: copy the labels stage's rankings into the RM or DPO
    stage's data cache, where it looks first."""
    if plan.cfg.labels != "simulated" or not is_world(stage_cfg.data.train):
        return  # human labels, the user's file, or the recipe's own data file (hh)
    out = Path(stage_cfg.run.out)
    for split in ("train", "eval"):
        target = out / "data" / f"{split}_rankings.jsonl"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plan.root / "labels" / "data" / f"{split}_rankings.jsonl", target)


def stages(plan: Plan) -> list[Stage]:
    root, sft_dir, rm_dir = plan.root, str(plan.root / "sft"), str(plan.root / "rm")
    cls, target, section, folder = RL_STAGES[plan.algo]
    needs_rm = plan.algo != "dpo" or not plan.world  # without a gold judge, the RM judges the eval
    collect = plan.world and plan.cfg.labels == "simulated"

    def skip_stage_eval(c: Any) -> None:
        if not plan.section("pipeline").get("stage_eval", True):
            c.eval.gold_prompts = 0  # the eval stage measures the same models on more prompts

    def wire_rm(c: RMConfig) -> None:
        c.model.name = sft_dir  # InstructGPT initialises the reward model from the SFT model
        c.run.out = rm_dir
        wire_preferences(plan, c)

    def wire_rl(c: Any) -> None:
        c.model.name = sft_dir
        if hasattr(c, "reward"):
            c.reward = rm_dir
        skip_stage_eval(c)
        if plan.algo == "dpo":
            c.run.out = str(root / folder)
            wire_preferences(plan, c)

    out = [train_stage(plan, "sft", SFTConfig, "rlhfkit.train.sft:train", "sft", skip_stage_eval)]
    if collect:
        out.append(labels_stage(plan))
    elif plan.cfg.labels == "human":
        out.append(Stage("labels", "labels", "labels", human_labels_stage(plan)))
    if needs_rm:
        out.append(train_stage(plan, "rm", RMConfig, "rlhfkit.train.rm:train", "rm", wire_rm, reads_labels=True))
    out.append(train_stage(plan, plan.algo, cls, target, section, wire_rl, reads_labels=plan.algo == "dpo"))
    out.append(Stage("eval", "eval", "eval", eval_stage(plan, folder)))
    return out


def eval_stage(plan: Plan, rl_folder: str) -> Callable[[Path], None]:
    def go(out: Path) -> None:
        from rlhfkit.eval.headline import evaluate_run

        eval_cfg = from_dict(EvalStageConfig, plan.section("eval"), f"recipe {plan.cfg.recipe}: eval")
        models = {"base": plan.base_model, "sft": str(plan.root / "sft"), rl_folder: str(plan.root / rl_folder)}
        judge = "gold" if plan.world else str(plan.root / "rm")
        prompts = WORLD if plan.world else plan.section("sft").get("data", {}).get("train", "")
        evaluate_run(models, rl=rl_folder, judge=judge, prompts=prompts, cfg=eval_cfg, out=out)

    return go


# --- sharing finished stages between runs ---------------------------------------------------------

# Where a stage's folder lives is not one of its settings.
NOT_SETTINGS = {("run", "out"), ("run", "resume"), ("run", "overwrite")}


def shared_source(plan: Plan, plan_stages: list[Stage], index: int, origins: dict[str, Path | None]) -> Path | None:
    """Another run's finished folder that this stage would write again, or None.

    A stage is the same when its settings are (paths inside each run compared relative to it) and
    so are its inputs: every earlier stage of this run came from that same run. `rlhfkit run --algo
    dpo` then reuses `runs/smollm2/sft`, and `--algo grpo` its SFT, labels and reward model.
    ``origins``: for each earlier stage, the run folder it came from (None: it ran here)."""
    stage = plan_stages[index]
    out = plan.root / stage.folder
    if stage.settings is None or (out.exists() and any(out.iterdir())):
        return None
    earlier = {origins.get(s.name) for s in plan_stages[:index]}
    if earlier == {None} or len(earlier) > 1:
        return None  # an earlier stage ran here, or they came from different runs
    if earlier:
        candidates = list(earlier)
    else:
        candidates = sorted(p for p in plan.root.parent.iterdir() if p != plan.root and (p / "run.yaml").is_file()) \
            if plan.root.parent.is_dir() else []
    settings = stage.settings(out)
    for other in candidates:
        source = other / stage.folder
        try:
            saved = yaml.safe_load((source / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if (source / COMPLETE).is_file() and isinstance(saved, dict) \
                and not config_differences(saved, settings, other, plan.root, NOT_SETTINGS):
            return other
    return None


def share(source: Path, out: Path, settings: dict) -> None:
    """Make ``out`` a copy of the finished stage folder ``source``: hard links (no extra disk,
    instant) where the filesystem allows, its resume checkpoints left out, and a config.yaml that
    names this run's folders. Renamed into place whole."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    tmp = out.with_name(f".{out.name}.sharing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("checkpoints", ".*"), copy_function=link_or_copy)
    (tmp / "config.yaml").unlink()  # a hard link into the other run: replaced, not written through
    save_config(settings, tmp / "config.yaml")
    if out.exists():
        out.rmdir()  # empty (shared_source checked)
    os.replace(tmp, out)


# --- running ------------------------------------------------------------------------------------


def drop_checkpoints(out: Path) -> None:
    """Delete a finished stage's resume checkpoints: a rerun skips the stage, so only its final
    model (beside complete.json) is ever read again."""
    if (out / COMPLETE).exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def record(root: Path, plan: Plan, done: dict[str, dict]) -> None:
    if not processes.is_main():
        return
    info = {"name": root.name, "recipe": plan.cfg.recipe, "algo": plan.algo, "labels": plan.cfg.labels,
            "stages": list(done.values())}
    tmp = root / ".pipeline.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, root / "pipeline.json")


def run(cfg: PipelineConfig) -> Path:
    from rich.console import Console

    # Under several processes (torchrun, accelerate launch) every one runs the training stages;
    # the main process alone writes the run's own files, evaluates and reports.
    main = processes.is_main()
    console = Console(highlight=False, quiet=not main)
    plan = make_plan(cfg)
    root = plan.root
    if cfg.labels not in ("simulated", "human") and not Path(cfg.labels).exists():
        raise RlhfkitError(f"--labels {cfg.labels}: no such file")
    check_settings(plan)
    if cfg.overwrite and root.exists() and main:
        shutil.rmtree(root)
    processes.wait_for_everyone()
    root.mkdir(parents=True, exist_ok=True)
    saved = root / "run.yaml"
    settings = {"recipe": cfg.recipe, "algo": plan.algo, "labels": cfg.labels, "set": list(cfg.set)}
    if saved.exists() and yaml.safe_load(saved.read_text()) != settings:
        old = yaml.safe_load(saved.read_text())
        raise RlhfkitError(f"{root} was started with {old}, not {settings}; pass --overwrite to start again, "
                           f"or --name to keep both runs")
    processes.wait_for_everyone()  # all have read it before it is written
    if main:
        saved.write_text(yaml.safe_dump(settings, sort_keys=False))

    plan_stages = stages(plan)
    previous = {}
    if (root / "pipeline.json").exists():
        previous = {s["name"]: s for s in json.loads((root / "pipeline.json").read_text()).get("stages", [])}
    done: dict[str, dict] = {}
    origins: dict[str, Path | None] = {}  # the run each stage's folder came from (None: this one)
    console.print(f"[bold]rlhfkit run {cfg.recipe}[/] -> {root}  ({' -> '.join(s.name for s in plan_stages)} -> report)")
    for i, stage in enumerate(plan_stages, 1):
        if stage.kind == "eval" and not processes.continue_alone():
            return root  # the other processes' part ends with training
        out = root / stage.folder
        entry = {"name": stage.name, "folder": stage.folder, "kind": stage.kind}
        if (out / COMPLETE).exists():
            console.print(f"[bold]stage {i}/{len(plan_stages)}: {stage.name}[/] already complete ({out}); skipping")
            before = previous.get(stage.name, {})
            done[stage.name] = {**entry, **{k: before[k] for k in ("shared_from",) if k in before},
                                "seconds": before.get("seconds"), "status": before.get("status") or "done"}
            origins[stage.name] = Path(before["shared_from"]).parent if before.get("shared_from") else None
            continue
        source = processes.broadcast(shared_source(plan, plan_stages, i - 1, origins) if main else None)
        if source is not None:
            start = time.perf_counter()
            if main:
                share(source / stage.folder, out, plan_stages[i - 1].settings(out))
            processes.wait_for_everyone()
            console.print(f"[bold]stage {i}/{len(plan_stages)}: {stage.name}[/] shared from {source / stage.folder}: "
                          f"that run finished it with the same settings and inputs (hard-linked, not run again)")
            done[stage.name] = {**entry, "shared_from": str(source / stage.folder),
                                "seconds": time.perf_counter() - start, "status": "shared"}
            origins[stage.name] = source
            record(root, plan, done)
            continue
        origins[stage.name] = None
        resumed = out.exists() and any(out.iterdir())
        console.rule(f"stage {i}/{len(plan_stages)}: {stage.name}" + (" (resuming)" if resumed else ""))
        start = time.perf_counter()
        done[stage.name] = {**entry, "seconds": None, "status": "running"}
        record(root, plan, done)
        stage.run(out)
        if not plan.section("pipeline").get("keep_checkpoints", False) and main:
            drop_checkpoints(out)
        processes.wait_for_everyone()
        earlier = (previous.get(stage.name, {}).get("seconds") or 0.0) if resumed else 0.0
        done[stage.name] = {**entry, "seconds": earlier + time.perf_counter() - start, "status": "done"}
        record(root, plan, done)

    from rlhfkit.eval.report import write_report

    report_path = write_report(root)
    console.print(summary_table(root, plan_stages))
    console.print(f"report: {report_path}")
    return root


def summary_table(root: Path, plan_stages: list[Stage]):
    """The final table: each stage's wall time and its headline number."""
    from rich.table import Table

    info = {s["name"]: s for s in json.loads((root / "pipeline.json").read_text())["stages"]}
    table = Table(title=f"rlhfkit run: {root}")
    for column in ("stage", "time", "result"):
        table.add_column(column)
    for stage in plan_stages:
        seconds = info.get(stage.name, {}).get("seconds")
        table.add_row(stage.name, f"{seconds / 60:.1f} min" if seconds else "-", headline(root / stage.folder, stage.kind))
    return table


def headline(folder: Path, kind: str) -> str:
    try:
        summary = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return ""
    if kind == "labels" and summary.get("labeler") == "human":
        return f"{summary['rankings.jsonl']} human rankings from {summary['db']}"
    if kind == "labels":
        return f"{summary['train_rankings']} train / {summary['eval_rankings']} held-out rankings of {summary['k']}"
    if kind == "rm":
        return f"held-out accuracy {summary.get('eval/accuracy', float('nan')):.3f}"
    if kind == "eval":
        return summary.get("headline", "")
    if "eval/gold_score" in summary:
        text = f"held-out gold {summary['eval/gold_score']:.3f}"
        if "eval/vs_sft_win_rate" in summary:
            text += f", win rate vs SFT {100 * summary['eval/vs_sft_win_rate']:.1f}%"
        return text
    shown = {"ppo/score": "RM score", "ppo/kl": "KL", "grpo/reward": "reward", "dpo/accuracy": "pair accuracy",
             "online/reward_mean": "reward of samples"}
    return ", ".join(f"{label} {summary[key]:.3f}" for key, label in shown.items() if key in summary)
