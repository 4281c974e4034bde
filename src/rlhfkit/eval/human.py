"""The human judge: people in the labelling app (`rlhfkit label serve`) decide each pair.

Every pair goes to the labelling database as a two-response task, in both orders (A, B) and
(B, A), so position bias cancels as it does for the other judges. A labeller's ranking is the
verdict: the better-ranked response wins, a tie counts half, several labellers average. Pairs
whose two answers are the same text are ties without asking anyone.

Until every pair has a verdict, the judge stops with the commands that collect them; the tasks
are keyed by their content, so running the same evaluation again (same models, prompts and
seed give the same answers) finds them and reads the verdicts.
"""

from __future__ import annotations

import hashlib
import json
from statistics import mean

from rlhfkit.data.records import Prompt, messages_to_dicts
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.winrate import PairJudge


def pair_key(name: str, prompt: Prompt, first: str, second: str) -> str:
    text = json.dumps([name, messages_to_dicts(prompt.messages), first, second], ensure_ascii=False)
    return "eval:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def verdict(ranks: tuple[int, ...]) -> float:
    """Preference for the first response from a two-response ranking (0 = best; ties share)."""
    return 0.5 if ranks[0] == ranks[1] else float(ranks[0] < ranks[1])


def human_judge(db: str, name: str) -> PairJudge:
    """A pairwise judge backed by the labelling database ``db`` (SQLite file or SQLAlchemy URL).
    ``name`` tells this evaluation's tasks apart from others with the same texts."""
    from rlhfkit.label.store import NewTask, Store

    store = Store(db)
    posted = False

    def judge(prompts: list[Prompt], first: list[str], second: list[str]) -> list[float]:
        nonlocal posted
        if not posted:  # post both orders at once, so labellers see every task of the evaluation
            both = [*zip(prompts, first, second), *zip(prompts, second, first)]
            store.add_tasks(NewTask(pair_key(name, p, a, b), p.messages, (a, b), f"eval {name}",
                                    {"eval": name, "pair_key": pair_key(name, p, a, b)})
                            for p, a, b in both if a != b)
            posted = True
        verdicts: dict[str, list[float]] = {}
        for label in store.labels():
            key = label.task_meta.get("pair_key")
            if key and label.kind == "rank" and label.ranks is not None:
                verdicts.setdefault(key, []).append(verdict(label.ranks))
        keys = [pair_key(name, p, a, b) for p, a, b in zip(prompts, first, second)]
        waiting = sum(1 for key, a, b in zip(keys, first, second) if a != b and key not in verdicts)
        if waiting:
            raise RlhfkitError(
                f"{waiting} of {len(keys)} pairs in this order still need a human verdict in {db} (every pair is "
                f"asked in both orders). Collect them, then run this command again:\n"
                f"  rlhfkit label add-labeller NAME --db {db}\n"
                f"  rlhfkit label serve --db {db}\n"
                "Answers are regenerated with the same seed, so the rerun finds the same tasks.")
        return [0.5 if a == b else mean(verdicts[key]) for key, a, b in zip(keys, first, second)]

    return judge
