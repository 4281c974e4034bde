"""Where labelling tasks come from: a file of prompts with responses, or a model answering prompts.

A task is one prompt with K >= 2 distinct, non-empty responses. Its key hashes what defines it (the
prompt and the responses, or the prompt and the model that will answer it), so starting the server
again with the same file or model adds no task twice and regenerates nothing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhfkit.data.formats import Format, parse_row, read_rows
from rlhfkit.data.records import Messages, Prompt, messages_to_dicts
from rlhfkit.errors import DataError
from rlhfkit.label.store import MAX_RESPONSES, NewTask, Store


def task_key(prompt: Messages, *parts: object) -> str:
    text = json.dumps([messages_to_dicts(prompt), *parts], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def distinct(responses: list[str]) -> list[str]:
    """Responses in order, without blanks or repeats: ranking a response against itself says nothing."""
    seen: dict[str, None] = {}
    for text in responses:
        if text.strip() and text not in seen:
            seen[text] = None
    return list(seen)


# --- from a file -------------------------------------------------------------------------------


def read_task_file(path: str) -> tuple[list[NewTask], int]:
    """Tasks from a JSONL/JSON/Parquet file, and how many prompts had < 2 distinct responses.

    Rows are either ``{prompt, responses: [...]}`` (``completions`` is read too, so a rankings file
    works; its ranks are ignored), one task per row, or ``{prompt, completion}`` rows such as the
    output of ``rlhfkit sample --n K``, gathered by prompt in file order.
    """
    groups: dict[str, tuple[Prompt, list[str]]] = {}
    for number, row in read_rows(path):
        prompt = parse_row(row, Format.PROMPT, path, number)  # validates the prompt, keeps meta
        texts = row.get("responses", row.get("completions"))
        if texts is None and "completion" in row:
            texts = [row["completion"]]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DataError(path, number, "responses",
                            "expected a list of response strings ({prompt, responses: [...]}) or a "
                            "'completion' string (rows written by `rlhfkit sample`)")
        group_key = json.dumps(messages_to_dicts(prompt.messages)) if "completion" in row else f"row {number}"
        groups.setdefault(group_key, (prompt, []))[1].extend(texts)
    tasks, dropped = [], 0
    for prompt, texts in groups.values():
        responses = distinct(texts)
        if len(responses) < 2:
            dropped += 1
            continue
        if len(responses) > MAX_RESPONSES:
            raise DataError(path, None, "responses", f"a prompt has {len(responses)} responses; at most "
                            f"{MAX_RESPONSES} fit on one page (InstructGPT ranked 4 to 9)")
        tasks.append(NewTask(task_key(prompt.messages, "responses", responses), prompt.messages, tuple(responses),
                             source=f"file:{Path(path).name}", meta=prompt.meta))
    return tasks, dropped


# --- from a model, in the background -----------------------------------------------------------


@dataclass
class GenerationStatus:
    """What the background generation is doing, shown on the admin page."""

    model: str
    prompts: int
    done: int = 0  # prompts answered (or found answered by an earlier run)
    tasks: int = 0  # tasks added by this run
    dropped: int = 0  # prompts whose K responses had fewer than 2 distinct non-empty ones
    state: str = "waiting"  # waiting, loading model, generating, done, failed
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerationSettings:
    model: str
    k: int
    max_new_tokens: int
    temperature: float
    batch_size: int
    seed: int


def start_generation(store: Store, prompts: list[Prompt], settings: GenerationSettings) -> GenerationStatus:
    """Answer every prompt K times in a daemon thread; tasks appear as each batch finishes."""
    status = GenerationStatus(settings.model, len(prompts))
    thread = threading.Thread(target=_generate_safely, args=(store, prompts, settings, status),
                              name="rlhfkit-label-generate", daemon=True)
    thread.start()
    return status


def _generate_safely(store: Store, prompts: list[Prompt], settings: GenerationSettings,
                     status: GenerationStatus) -> None:
    try:
        generate_tasks(store, prompts, settings, status)
    except Exception as e:  # the labelling app keeps serving the tasks it has; the admin sees why
        status.state, status.error = "failed", f"{type(e).__name__}: {e}"
        print(f"rlhfkit label: generating responses failed: {status.error}", file=sys.stderr)


def generate_tasks(store: Store, prompts: list[Prompt], settings: GenerationSettings,
                   status: GenerationStatus) -> None:
    import torch

    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_model, load_tokenizer
    from rlhfkit.generation import generate

    k = settings.k
    keys = [task_key(p.messages, "model", settings.model, k) for p in prompts]
    known = store.known_keys(keys)
    todo = [(p, key) for p, key in zip(prompts, keys) if key not in known]
    status.done = len(prompts) - len(todo)
    if not todo:
        status.state = "done"
        return
    status.state = "loading model"
    tokenizer = load_tokenizer(settings.model)
    model = load_model(ModelConfig(name=settings.model), tokenizer, seed=settings.seed)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    status.state = "generating"
    per_batch = max(1, settings.batch_size // k)  # prompts per batch: all K answers of a prompt together
    for start in range(0, len(todo), per_batch):
        chunk = todo[start : start + per_batch]
        gens = generate(model, tokenizer, [p.messages for p, _ in chunk for _ in range(k)], settings.max_new_tokens,
                        temperature=settings.temperature, batch_size=settings.batch_size,
                        generator_seed=settings.seed + start)  # private RNG: same prompts, same answers
        new = []
        for i, (prompt, key) in enumerate(chunk):
            responses = distinct([g.text for g in gens[i * k : (i + 1) * k]])
            if len(responses) < 2:
                status.dropped += 1
                continue
            new.append(NewTask(key, prompt.messages, tuple(responses), source=f"model:{settings.model}",
                               meta=prompt.meta))
        status.tasks += store.add_tasks(new)
        status.done += len(chunk)
    status.state = "done"
