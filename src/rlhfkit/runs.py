"""The run-folder protocol every stage shares: the output folder and its saved config,
checkpoints written atomically with exact resume, ``metrics.jsonl``, and ``complete.json``, written
last, whose presence means the stage finished."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.config import RunConfig, save_config, to_dict
from rlhfkit.errors import RlhfkitError

COMPLETE = "complete.json"  # written last: its presence means the stage finished


# --- output folder, checkpoints and resume ----------------------------------------------------


def check_out_dir(run: RunConfig) -> None:
    """Refuse to clobber a previous run unless resuming or overwriting."""
    out = Path(run.out)
    if out.exists() and any(out.iterdir()) and not run.resume and not run.overwrite:
        raise RlhfkitError(f"{out} already holds a run; pass --run.resume to continue it or --run.overwrite to replace it")


def prepare_out_dir(run: RunConfig, cfg: Any, is_main: bool) -> Path:
    """Create ``run.out`` (emptied first with ``run.overwrite``) and save the config in it."""
    out = Path(run.out)
    if out.exists() and any(out.iterdir()) and not run.resume and run.overwrite and is_main:
        shutil.rmtree(out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        saved = out / "config.yaml"
        if run.resume and saved.exists():
            check_same_config(saved, cfg)
        save_config(cfg, saved)
    return out


def check_same_config(saved: Path, cfg: Any) -> None:
    """Resuming with different settings would not give the uninterrupted run's weights."""
    import yaml

    old = yaml.safe_load(saved.read_text())
    # Where the folder lives does not change the weights: a moved or copied run resumes, and so
    # does a moved pipeline, whose stages name their sibling folders (../sft, ../rm).
    ignore = {("run", "resume"), ("run", "overwrite"), ("run", "steps"), ("run", "out")}
    diffs = config_differences(old, to_dict(cfg), Path(old["run"]["out"]).parent, Path(cfg.run.out).parent, ignore,
                               defaults=to_dict(type(cfg)()))
    if diffs:
        raise RlhfkitError(f"cannot resume {saved.parent}: the config changed ({'; '.join(diffs)})")


def config_differences(old: dict, new: dict, old_home: Path, new_home: Path, ignore: set[tuple[str, str]],
                       defaults: dict | None = None) -> list[str]:
    """``section.key: old -> new`` for each setting that differs, where a path under ``old_home``
    and one under ``new_home`` are the same setting when they are the same relative path. A
    setting that ``old`` lacks (saved before the field existed) is the same when ``new`` keeps
    its default from ``defaults``."""
    defaults = defaults or {}

    def same(a: Any, b: Any) -> bool:
        if a == b:
            return True
        if not (isinstance(a, str) and isinstance(b, str)):
            return False
        a_path, b_path = Path(a), Path(b)
        return (a_path.is_relative_to(old_home) and b_path.is_relative_to(new_home)
                and a_path.relative_to(old_home) == b_path.relative_to(new_home))

    def new_default(old_body: dict, key: str, value: Any, default_body: Any) -> bool:
        return key not in old_body and isinstance(default_body, dict) and key in default_body and default_body[key] == value

    top = [f"{key}: {old.get(key)!r} -> {value!r}" for key, value in new.items()
           if not isinstance(value, dict) and not same(old.get(key), value)
           and not new_default(old, key, value, defaults)]  # e.g. PPO's `reward`
    # A section ``old`` lacks altogether (added since, e.g. `rollout`) holds only new settings.
    sections = {sec: old.get(sec, {}) for sec, body in new.items() if isinstance(body, dict)}
    return top + [
        f"{sec}.{key}: {sections[sec].get(key)!r} -> {value!r}"
        for sec, body in new.items()
        if isinstance(body, dict) and isinstance(sections[sec], dict)
        for key, value in body.items()
        if (sec, key) not in ignore and not same(sections[sec].get(key), value)
        and not new_default(sections[sec], key, value, defaults.get(sec))
    ]


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict keyed by parameter name (``train.sharding.state_dicts``)
    into tensors ``name/key`` (for safetensors) and JSON-able metadata."""
    tensors, scalars = {}, {}
    for name, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "keys": "names"}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def distinct_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` without the later names of a shared tensor (a tied LM head): safetensors
    refuses to write two names of one storage; loading the first fills both."""
    seen: set[tuple[int, int]] = set()
    kept = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            kept[name] = t.contiguous()
    return kept


def save_checkpoint(
    out: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler, extra: dict,
    keep: int, extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temp folder renamed at the end), so a kill -9
    mid-write leaves the previous checkpoint as the latest valid one. ``weights``: the trainable
    ones (LoRA: just adapters) and ``optimizer_state``, whole and keyed by name, so any number
    of processes, sharded or not, can resume it."""
    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(distinct_storage(weights), tmp / "trainable.safetensors")
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer_state)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    if extra_tensors:  # stage tensors beyond weights and optimizer (PPO's EMA weights)
        save_file({k: v.contiguous() for k, v in extra_tensors.items()}, tmp / "extra.safetensors")
    state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), **extra}
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_to_resume(out: Path, run: RunConfig, say) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start. A complete run never gets
    here (``train.loop.begin_stage`` stops first)."""
    if not run.resume:
        return None
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        say(f"no checkpoint in {out}; starting from step 0")
    return ckpt


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(ckpt: Path, scheduler) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Restore the schedule and RNG; return (the saved state: ``step`` etc., the trainable
    weights, the optimizer state), for ``train.sharding.load_state_dicts``."""
    state = json.loads((ckpt / "state.json").read_text())
    if state["optimizer"].get("keys") != "names":
        raise RlhfkitError(f"{ckpt} was written by an older rlhfkit (optimizer state by position, not by name): "
                           "resume it with that version, or start over with --run.overwrite")
    optimizer_state = unflatten_optimizer_state(load_file(ckpt / "optimizer.safetensors"), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(ckpt / "rng.safetensors")["torch"])
    if (ckpt / "extra.safetensors").exists():
        state["tensors"] = load_file(ckpt / "extra.safetensors")
    return state, load_file(ckpt / "trainable.safetensors"), optimizer_state


# --- metrics ----------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus TensorBoard, main process only.

    On resume, lines past the resumed step are dropped so the file describes one trajectory.
    """

    def __init__(self, out: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step or None)
        except ImportError:  # tensorboard is a declared dependency; stay usable without it
            self.writer = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def mark_complete(out: Path, summary: dict) -> None:
    tmp = out / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / COMPLETE)
