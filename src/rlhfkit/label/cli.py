"""`rlhfkit label serve | add-labeller | export`: the commands of the labelling app."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from rlhfkit.errors import ConfigError
from rlhfkit.hosts import allowed_hosts, is_loopback

ADMIN_TOKEN_ENV = "RLHFKIT_ADMIN_TOKEN"


@dataclass
class LabelServeConfig:
    """Serve the labelling web app: labellers sign in with a token and rank K responses per prompt
    (ties allowed), skip, flag unsafe content or write a better answer; /admin shows progress."""

    db: str = "labels.db"
    """A SQLite file (created if missing) or any SQLAlchemy URL, e.g. postgresql+psycopg://user:password@host/labels."""
    responses: str = ""
    """Tasks from a file: JSONL/JSON/Parquet rows of {prompt, responses: [...]}, or the output of
    `rlhfkit sample --n K` ({prompt, completion} rows, gathered by prompt)."""
    model: str = ""
    """Generate the responses in the background with this model (built-in name such as `tiny`, a local
    model folder, or a hub id) for the prompts of --prompts; tasks appear as batches finish."""
    prompts: str = ""
    """With --model: a JSONL/JSON/Parquet file whose rows have `prompt` (a string or chat messages)."""
    k: int = 4
    """Responses generated per prompt with --model (InstructGPT ranked 4 to 9)."""
    labels_per_task: int = 3
    """Each task goes to at most this many labellers; a labeller never gets the same task twice."""
    host: str = "127.0.0.1"
    """Address to listen on. The default accepts this machine only; to let others in, put a TLS reverse
    proxy in front (tokens and labels would otherwise cross the network in clear text)."""
    port: int = 8000
    """Port to listen on."""
    allowed_host: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Another name this server answers to in the Host header (`*.example.com` for a domain), e.g. the
    public name a reverse proxy forwards; other names get 400. Always accepted: localhost, 127.0.0.1, --host."""
    admin_token: str = ""
    """The admin token (for /admin); or set $RLHFKIT_ADMIN_TOKEN, which `ps` does not show (this flag wins).
    Neither: keep the stored one, or make one at first start and print it."""
    temperature: float = 1.0
    """Sampling temperature with --model; must be > 0 for K different responses."""
    max_new_tokens: int = 256
    """Longest generated response, in tokens."""
    seed: int = 0
    """Sampling seed with --model (the same prompts get the same responses)."""

    def check(self) -> None:
        if self.prompts and not self.model:
            raise ConfigError("--prompts needs --model to answer them; for prompts that already have "
                              "responses use --responses")
        if self.model and not self.prompts:
            raise ConfigError("--model needs --prompts: a file of prompts for it to answer")
        if self.k < 2:
            raise ConfigError(f"k must be at least 2 (a ranking compares responses), got {self.k}")
        if self.labels_per_task < 1 or self.max_new_tokens < 1:
            raise ConfigError("labels_per_task and max_new_tokens must be positive")
        if self.model and self.temperature <= 0:
            raise ConfigError(f"temperature {self.temperature} (greedy) gives {self.k} identical responses; use > 0")
        if self.model:  # here, not in the background generation, where only the admin page would say it
            from rlhfkit.models import check_model_name

            check_model_name(self.model)
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        try:
            allowed_hosts(self.host, self.allowed_host)
        except ValueError as e:
            raise ConfigError(f"--host / --allowed-host: {e}") from None


def serve(cfg: LabelServeConfig) -> None:
    import uvicorn

    from rlhfkit.data.formats import read_prompts
    from rlhfkit.label.app import create_app
    from rlhfkit.label.store import Store
    from rlhfkit.label.tasks import GenerationSettings, read_task_file, start_generation

    cfg.check()
    prompts = read_prompts(cfg.prompts, format="prompt")[0] if cfg.model else []  # a bad file fails first
    store = Store(cfg.db, labels_per_task=cfg.labels_per_task)
    made = store.set_admin_token(cfg.admin_token or os.environ.get(ADMIN_TOKEN_ENV, ""))
    if made:
        print(f"admin token (shown this once, stored hashed): {made}")
    if cfg.responses:
        tasks, dropped = read_task_file(cfg.responses)
        added = store.add_tasks(tasks)
        note = f"; {dropped} prompts left out (fewer than 2 distinct non-empty responses)" if dropped else ""
        print(f"{cfg.responses}: {len(tasks)} tasks, {added} new{note}")
    generation = None
    if cfg.model:
        settings = GenerationSettings(cfg.model, cfg.k, cfg.max_new_tokens, cfg.temperature, batch_size=16,
                                      seed=cfg.seed)
        generation = start_generation(store, prompts, settings)
        print(f"generating {cfg.k} responses for each of {len(prompts)} prompts with {cfg.model} in the background")
    if not cfg.responses and not cfg.model and store.stats()["tasks"] == 0:
        print("no tasks yet: pass --responses FILE, or --model MODEL --prompts FILE")
    if not store.labeller_names():
        print(f"no labellers yet: add one with `rlhfkit label add-labeller NAME --db {cfg.db}`")
    if not is_loopback(cfg.host):
        print(f"warning: listening on {cfg.host}, beyond this machine: serve it through a TLS reverse proxy")
    hosts = allowed_hosts(cfg.host, cfg.allowed_host)
    if hosts is None:
        print(f"warning: {cfg.host} is every address, so any Host header is answered: name this server's with "
              "--allowed-host to refuse the rest (DNS rebinding)")
    print(f"labelling app on http://{cfg.host}:{cfg.port}/ (admin page: /admin)", flush=True)
    app = create_app(store, generation, allowed_hosts=hosts)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)


@dataclass
class AddLabellerConfig:
    """Create a labeller and print their sign-in token (stored hashed: it is shown only now)."""

    name: tyro.conf.Positional[str]
    """The labeller's name, shown on the admin page and in the exported files' meta."""
    db: str = "labels.db"
    """A SQLite file (created if missing) or any SQLAlchemy URL, e.g. postgresql+psycopg://user:password@host/labels."""
    rotate: bool = False
    """Give an existing labeller a new token; the old one and its sign-ins stop working."""


def add_labeller(cfg: AddLabellerConfig) -> None:
    from rlhfkit.label.store import Store

    token = Store(cfg.db).add_labeller(cfg.name, rotate=cfg.rotate)
    print(f"token for {cfg.name} (shown this once): {token}")


@dataclass
class LabelExportConfig:
    """Write the collected answers as training files: rankings.jsonl (rlhfkit rm), comparisons.jsonl
    (rlhfkit dpo), demonstrations.jsonl (rlhfkit sft), flags.jsonl and meta.json."""

    db: str = "labels.db"
    """The labelling database: a SQLite file or a SQLAlchemy URL."""
    out: str = "labels"
    """Output folder (created if missing; its files are replaced whole)."""


def export(cfg: LabelExportConfig) -> None:
    from rlhfkit.label.export import export as write_files
    from rlhfkit.label.store import Store

    if "://" not in cfg.db and not Path(cfg.db).expanduser().is_file():
        raise ConfigError(f"no labelling database at {cfg.db}")
    meta = write_files(Store(cfg.db), cfg.out)
    for name, n in meta["exported"].items():
        print(f"{Path(cfg.out) / name}: {n} rows")
    left = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in meta["left_out"].items() if n)
    if left:
        print(f"left out of the preferences: {left}")
    print(f"train on them: rlhfkit rm --data.train {cfg.out}/rankings.jsonl; rlhfkit dpo --data.train "
          f"{cfg.out}/comparisons.jsonl; rlhfkit sft --data.train {cfg.out}/demonstrations.jsonl")
