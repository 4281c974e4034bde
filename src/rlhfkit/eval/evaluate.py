"""`rlhfkit eval`: one model against another (or the reference answers) under a pairwise judge.

Read top to bottom: 1. prompts (the world's eval split or a file), 2. both sides' responses,
3. the judge (gold, reward model or LLM), every pair judged in both orders, 4. the win rate with
its bootstrap interval and the length-controlled rate, 5. per side: length, EOS, gold score;
KL of the model to the other model on the model's own samples; the reward model's accuracy on
held-out comparisons, 6. a table, and a JSON file with every prompt's responses and verdicts.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit import processes
from rlhfkit.chunks import (
    CHUNK,
    PartialFile,
    chunk_ranges,
    chunk_seed,
    fingerprint,
    partial_path,
)
from rlhfkit.config import ModelConfig, RolloutConfig, require_positive
from rlhfkit.data.records import Messages, Prompt, messages_to_dicts
from rlhfkit.data.sources import is_world, world_of
from rlhfkit.errors import ConfigError, DataError, RlhfkitError
from rlhfkit.eval.winrate import PairJudge, WinRate, gold_pair_judge, win_rate
from rlhfkit.logprobs import logprobs as response_logprobs
from rlhfkit.logprobs import running_in
from rlhfkit.records import join
from rlhfkit.generation import Generation, SavedModelSampler, request_seeds

REFERENCE = "reference"
REFERENCE_FIELDS = ("completion", "response", "chosen")  # where a prompts file keeps its reference answer


@dataclass
class LLMJudgeConfig:
    base_url: str = ""
    """OpenAI-compatible API root: http://localhost:8000/v1 (vLLM), http://localhost:8080/v1 (llama.cpp server), http://localhost:11434/v1 (Ollama), https://api.openai.com/v1."""
    model: str = ""
    """The judge model's name at that endpoint."""
    api_key: str = ""
    """API key; empty reads OPENAI_API_KEY (local servers usually need none). Never printed or saved."""
    concurrency: int = 4
    """Requests in flight at once."""
    timeout: float = 60.0
    """Seconds to wait for one answer before retrying."""
    max_retries: int = 4
    """Retries (exponential backoff) on rate limits, server errors and dropped connections."""


@dataclass
class EvalConfig:
    """Win rate of one model against another (or the reference answers) under a judge."""

    model: str
    """The model to evaluate: a model folder or a built-in name."""
    against: str = REFERENCE
    """The other side: a model folder or built-in name, or `reference` (the world's demonstrator's answers, or a prompts file's `completion`/`response`/`chosen` field)."""
    prompts: str = "world"
    """`world` (the world's held-out eval split) or a JSONL/JSON/Parquet file of `prompt` records (text or messages), read whole."""
    n_prompts: int = 128
    """World prompts to answer (and, with `--comparisons world`, world prompts whose rankings test the RM)."""
    world_seed: int = 0
    """Seed of the world's prompt generator."""
    judge: Literal["gold", "rm", "llm", "human"] = "gold"
    """`gold` (the world's gold judge; world prompts only), `rm` (a reward model, --rm), `llm` (an OpenAI-compatible endpoint, --llm.*), `human` (labellers in `rlhfkit label serve`, --db)."""
    db: str = "labels.db"
    """With `--judge human`: the labelling app's database (a SQLite file or an SQLAlchemy URL). The first run posts the pairs there and stops; rerun once they are ranked."""
    rm: str = ""
    """Reward-model folder: the `rm` judge, and the RM's accuracy on --comparisons."""
    rm_margin: float = 0.0
    """With `--judge rm`, reward differences up to this size count as ties."""
    comparisons: str = ""
    """Held-out comparisons/rankings to measure --rm's accuracy on: a file, or `world` (simulated labelers' rankings of world eval candidates)."""
    llm: LLMJudgeConfig = field(default_factory=LLMJudgeConfig)
    temperature: float = 0.0
    """Sampling temperature for both models; 0 = greedy. The KL estimate is unbiased only at 1."""
    max_new_tokens: int = 48
    """Response length limit."""
    batch_size: int = 16
    """Prompts per generation (and scoring) batch."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` (default): bf16 autocast where it measures clearly faster for this model on this machine, else fp32 (measured once, cached). `bf16`: forward passes under bf16 autocast, weights stay fp32. `fp32`."""
    seed: int = 0
    """Sampling seed."""
    out: str = "eval.json"
    """Output JSON: the summary and every prompt's responses and verdicts."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Which engine answers (vLLM: started from each model's folder, closed after)."""

    def check(self) -> None:
        require_positive(self, "n_prompts", "max_new_tokens", "batch_size", "llm.concurrency")
        self.rollout.check(lora=False)
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.judge == "gold" and not is_world(self.prompts):
            raise ConfigError(f"--judge gold needs the built-in world's prompts (--prompts world), not "
                              f"'{self.prompts}': only world prompts have a gold judge; use --judge rm or llm")
        if self.judge == "rm" and not self.rm:
            raise ConfigError("--judge rm needs --rm PATH (a reward-model folder from `rlhfkit rm`)")
        if self.judge == "llm" and not (self.llm.base_url and self.llm.model):
            raise ConfigError("--judge llm needs --llm.base-url (e.g. http://localhost:8000/v1) and --llm.model")
        if self.comparisons and not self.rm:
            raise ConfigError("--comparisons measures a reward model's accuracy: give it with --rm PATH")
        from rlhfkit.models import check_model_name

        # Now, not after minutes of answers: --against and --rm are loaded only once the model has answered.
        check_model_name(self.model)
        if self.against != REFERENCE:
            check_model_name(self.against)
        if self.rm:
            check_model_name(self.rm, "reward model")


# --- KL of one model to another -----------------------------------------------------------------


def sequence_kl_from_logprobs(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 estimate of KL(policy || reference) per sequence: sum_t (log p - log q) over response
    tokens. (B, R), (B, R), mask (B, R) 1 on response tokens -> (B,).
    Unbiased when the responses were sampled from the policy at temperature 1; can be negative."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


@torch.no_grad()
def sequence_kl(policy, reference, tokenizer, prompts: list[Messages], generations: list[Generation],
                batch_size: int = 16, precision: str = "fp32") -> list[float]:
    """Per response, sum over its tokens of log pi_policy - log pi_reference (the k1 estimate of
    the sequence KL; average it over responses for KL(policy || reference)). Both models must
    share ``tokenizer``; logprobs are of the models' own (temperature 1) distributions."""
    from rlhfkit.data.tokenize import prompt_ids

    if len(prompts) != len(generations):
        raise ValueError(f"{len(prompts)} prompts but {len(generations)} generations")
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]) + len(generations[i].token_ids))
    out = [0.0] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = join([encoded[i] for i in idx], [generations[i].token_ids for i in idx], tokenizer.pad_token_id)
        with running_in(precision):
            logprobs = response_logprobs(policy, seqs)
            ref_logprobs = response_logprobs(reference, seqs)
        kl = sequence_kl_from_logprobs(logprobs.float().cpu(), ref_logprobs.float().cpu(), seqs.response_mask.float())
        for i, value in zip(idx, kl.tolist()):
            out[i] = value
    return out


# --- 1. prompts ---------------------------------------------------------------------------------


def load_prompts(cfg: EvalConfig) -> tuple[list[Prompt], list[str] | None]:
    """The prompts, and their reference answers when the source has them."""
    if (world := world_of(cfg.prompts, cfg.world_seed)) is not None:
        prompts = world.prompts(cfg.n_prompts, "eval")
        return prompts, [world.demonstrate(p) for p in prompts]
    from rlhfkit.data.formats import Format, parse_row, read_rows

    prompts, references = [], []
    for line, row in read_rows(cfg.prompts):
        prompts.append(parse_row(row, Format.PROMPT, cfg.prompts, line))
        references.append(_reference_answer(row, cfg.prompts, line))
    if not prompts:
        raise RlhfkitError(f"no prompts in {cfg.prompts}")
    return prompts, (references if all(r is not None for r in references) else None)


def _reference_answer(row: dict, path: str, line: int) -> str | None:
    for name in REFERENCE_FIELDS:
        value = row.get(name)
        if isinstance(value, list) and value and isinstance(value[-1], dict):  # [{"role": "assistant", ...}]
            value = value[-1].get("content")
        if value is not None:
            if not isinstance(value, str):
                raise DataError(path, line, name, f"expected the reference answer as a string, got {type(value).__name__}")
            return value
    return None


# --- 2. responses -------------------------------------------------------------------------------


@dataclass
class Side:
    """One side of the comparison: its name, texts, and (for a model) its generations."""

    name: str
    texts: list[str]
    generations: list[Generation] | None = None  # None for reference answers
    model: Any = None
    tokenizer: Any = None


def answer(name: str, prompts: list[Prompt], cfg: EvalConfig, device: str, log: PartialFile, done: list[list],
           first: int, ranges: list[range]) -> Side:
    """The model's answers, chunk by chunk: units ``first`` .. of ``log`` (those in ``done``, the
    partial file's finished chunks, are read back instead of generated)."""
    from rlhfkit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(name)
    model_cfg = ModelConfig(name=name, precision=cfg.precision)
    model = load_model(model_cfg, tokenizer, seed=cfg.seed).to(device)
    if processes.is_main():
        print(f"answering {len(prompts)} prompts with {name} "
              f"({'greedy' if cfg.temperature == 0 else f'temperature {cfg.temperature}'})")
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        if first + len(ranges) > len(done):  # answers are left to sample (the model itself stays, for KL)
            sampler = stack.enter_context(SavedModelSampler(name, tokenizer, model_cfg, cfg.rollout, cfg.batch_size,
                                                            seed=cfg.seed, loaded=model))
        for c, r in enumerate(ranges):
            if first + c < len(done):
                rows += done[first + c]
                continue
            gens = sampler.generate([prompts[i].messages for i in r], cfg.max_new_tokens, cfg.temperature,
                                    request_seeds(chunk_seed(cfg.seed, "eval", c), len(r)), spread=True,
                                    progress=f"{name}, chunk {c + 1}/{len(ranges)}" if len(ranges) > 1 else "")
            new = [{"text": g.text, "token_ids": g.token_ids, "finished": g.finished} for g in gens]
            log.append(new)
            rows += new
    gens = [Generation(row["text"], row["token_ids"], row["finished"]) for row in rows]
    return Side(name, [g.text for g in gens], gens, model, tokenizer)


def same_tokenizer(a, b) -> bool:
    """Per-token KL compares the two models' probabilities of the same token ids after the same
    rendered prompt: it needs one vocabulary and one chat template."""
    return a is b or (a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template)


# --- 3. the judge -------------------------------------------------------------------------------


def make_judge(cfg: EvalConfig, rm) -> PairJudge:
    if cfg.judge == "gold":
        from rlhfkit.data.world import World

        return gold_pair_judge(World(seed=cfg.world_seed))
    if cfg.judge == "rm":
        from rlhfkit.eval.judges import reward_model_judge

        return reward_model_judge(rm, cfg.rm_margin, cfg.batch_size)
    if cfg.judge == "human":
        from rlhfkit.eval.human import human_judge

        return human_judge(cfg.db, f"{cfg.model} vs {cfg.against}, seed {cfg.seed}, T {cfg.temperature}")
    from rlhfkit.eval.judges import llm_judge

    return llm_judge(cfg.llm.base_url, cfg.llm.model, cfg.llm.api_key, concurrency=cfg.llm.concurrency,
                     timeout=cfg.llm.timeout, max_retries=cfg.llm.max_retries)


# --- 5. reward-model accuracy on held-out comparisons ----------------------------------------


def rm_accuracy(rm, source: str, cfg: EvalConfig) -> dict[str, float]:
    """Share of held-out (better, worse) pairs where the RM scores the better one higher; on world
    data also against the gold judge's order (the labelers are noisy)."""
    from rlhfkit.data.preferences import as_ranking
    from rlhfkit.stats import gold_agreement

    if (world := world_of(source, cfg.world_seed)) is not None:
        from rlhfkit.data.world import Labeler, make_rankings

        rankings = make_rankings(world, cfg.n_prompts, 4, Labeler(seed=cfg.seed), "eval", cfg.seed)
    else:
        from rlhfkit.data.formats import read_records
        from rlhfkit.data.records import Comparison, Ranking

        records, report = read_records(source)
        print(report.summary())
        if not all(isinstance(r, (Comparison, Ranking)) for r in records):
            raise RlhfkitError(f"--comparisons {source}: expected comparisons or rankings")
        rankings = [as_ranking(r) for r in records]
    flat = [(r.prompt, c) for r in rankings for c in r.completions]
    scores = rm.score([p for p, _ in flat], [c for _, c in flat], batch_size=cfg.batch_size)
    correct = pairs = gold_correct = gold_pairs = 0
    at = 0
    for r in rankings:
        s = scores[at : at + len(r.completions)]
        at += len(r.completions)
        for better, worse in r.pairs():
            correct += s[better] > s[worse]
            pairs += 1
        gold = r.meta.get("gold")
        if gold:
            c, n = gold_agreement(s, gold)
            gold_correct, gold_pairs = gold_correct + c, gold_pairs + n
    out = {"source": source, "pairs": pairs, "accuracy": correct / max(pairs, 1)}
    if gold_pairs:
        out["gold_accuracy"] = gold_correct / gold_pairs
    return out


# --- the command ------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig, chunk: int = CHUNK) -> dict:
    """``chunk``: prompts per resumable chunk of answers."""
    from rlhfkit.precision import resolve

    cfg.check()
    cfg.precision = resolve(cfg.precision, cfg.model, flag="--precision")
    device = processes.device()
    world = world_of(cfg.prompts, cfg.world_seed)  # None for a prompts file: no gold judge

    # 1. Prompts (and reference answers, when the source has them).
    prompts, references = load_prompts(cfg)
    if cfg.against == REFERENCE and references is None:
        raise RlhfkitError(f"--against reference needs a reference answer in every record of {cfg.prompts} "
                           f"(a {'/'.join(REFERENCE_FIELDS)} field); or compare with --against MODEL")

    # 2. Both sides' responses, in chunks recorded beside --out as they finish (an interrupted
    # run, or one stopped to wait for human verdicts, answers only what is left).
    ranges = chunk_ranges(len(prompts), chunk)
    settings = {"model": cfg.model, "against": cfg.against, "chunk": chunk, "engine": cfg.rollout.engine,
                "prompts": fingerprint([messages_to_dicts(p.messages) for p in prompts]),
                **{k: getattr(cfg, k) for k in ("temperature", "max_new_tokens", "batch_size", "precision", "seed")}}
    n_sides = 1 if cfg.against == REFERENCE else 2
    log = PartialFile(partial_path(Path(cfg.out)), settings, [len(r) for _ in range(n_sides) for r in ranges], "eval")
    done = log.load()
    ours = answer(cfg.model, prompts, cfg, device, log, done, 0, ranges)
    if cfg.against == REFERENCE:
        theirs = Side(REFERENCE, references)
    else:
        theirs = answer(cfg.against, prompts, cfg, device, log, done, len(ranges), ranges)
    if not processes.is_main():  # the others answered their shares; the main process judges and writes
        processes.close()  # leave now, not wait on the main process's judging (past the group's timeout)
        return {}

    # 3-4. Judge both orders; win rate, interval, length control (lengths in the model's tokens).
    rm = None
    if cfg.rm:
        from rlhfkit.reward import RewardModel

        rm = RewardModel.load(cfg.rm, precision=cfg.precision)
        rm.model.to(device)
    judge = make_judge(cfg, rm)
    print(f"judging {len(prompts)} pairs in both orders with the {cfg.judge} judge")
    ours_len = [_tokens(ours.tokenizer, t) for t in ours.texts]
    theirs_len = [_tokens(ours.tokenizer, t) for t in theirs.texts]
    result = win_rate(judge, prompts, ours.texts, theirs.texts, seed=cfg.seed,
                      length_diffs=[a - b for a, b in zip(ours_len, theirs_len)])

    # 5. Per-side statistics, KL, RM accuracy.
    sides = {"model": side_stats(ours, ours_len, prompts, world), "against": side_stats(theirs, theirs_len, prompts, world)}
    kl, kl_note = None, None
    if theirs.model is not None:
        if same_tokenizer(ours.tokenizer, theirs.tokenizer):
            kl = sequence_kl(ours.model, theirs.model, ours.tokenizer, [p.messages for p in prompts], ours.generations,
                             cfg.batch_size, cfg.precision)
            if cfg.temperature != 1:
                kl_note = (f"responses were sampled at temperature {cfg.temperature}, not 1: not an unbiased "
                           "estimate of KL(model || against); use --temperature 1 for that")
        else:
            kl_note = "not computed: the two models have different tokenizers or chat templates"
    report: dict[str, Any] = {
        "model": cfg.model, "against": cfg.against, "judge": cfg.judge, "prompts": cfg.prompts,
        "n": len(prompts), "win_rate": _win_rate_dict(result), "sides": sides,
        "kl": None if theirs.model is None else
        {"mean": None if kl is None else sum(kl) / len(kl), "estimator": "k1", "note": kl_note},
    }
    if cfg.judge == "llm":
        report["llm_judge"] = {"url": judge.url, "model": cfg.llm.model, "requests": judge.requests,
                               "unparseable": judge.unparseable, "unparseable_examples": judge.examples_unparseable}
        judge.close()
    if rm is not None and cfg.comparisons:
        report["rm_accuracy"] = rm_accuracy(rm, cfg.comparisons, cfg)
    report["config"] = _public_config(cfg)
    report["records"] = per_prompt_records(prompts, ours, theirs, result, ours_len, theirs_len, kl, world)

    # 6. Table and JSON.
    print_table(report)
    write_json(Path(cfg.out), report)
    log.remove()
    print(f"wrote {cfg.out}")
    return report


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def side_stats(side: Side, lengths: list[int], prompts: list[Prompt], world) -> dict[str, Any]:
    n = len(prompts)
    stats: dict[str, Any] = {"name": side.name, "mean_tokens": sum(lengths) / n,
                             "eos_fraction": None if side.generations is None else sum(g.finished for g in side.generations) / n}
    if world is not None:
        stats["gold_score"] = sum(s.score for s in world.judge_many(prompts, side.texts)) / n
    return stats


def _win_rate_dict(result: WinRate) -> dict[str, Any]:
    lc = result.length_controlled
    return {"win_rate": result.win_rate, "low": result.low, "high": result.high, "wins": result.wins,
            "ties": result.ties, "losses": result.losses, "position_consistency": result.position_consistency,
            "length_controlled": None if lc is None else asdict(lc)}


def per_prompt_records(prompts, ours: Side, theirs: Side, result: WinRate, ours_len, theirs_len, kl, world) -> list[dict]:
    """One auditable record per prompt: both responses and the judge's verdict in each order
    (``verdict_model_first`` is the preference for the model shown first, ``verdict_against_first``
    the preference for the other side shown first)."""
    gold_ours = world.judge_many(prompts, ours.texts) if world is not None else None
    gold_theirs = world.judge_many(prompts, theirs.texts) if world is not None else None
    out = []
    for i, p in enumerate(prompts):
        row = {"prompt": messages_to_dicts(p.messages), "model_response": ours.texts[i],
               "against_response": theirs.texts[i], "verdict_model_first": result.a_first[i],
               "verdict_against_first": result.b_first[i], "preference": result.per_pair[i],
               "model_tokens": ours_len[i], "against_tokens": theirs_len[i]}
        if gold_ours is not None:
            row["model_gold"], row["against_gold"] = gold_ours[i].score, gold_theirs[i].score
        if kl is not None:
            row["kl"] = kl[i]
        out.append(row)
    return out


def _public_config(cfg: EvalConfig) -> dict:
    config = asdict(cfg)
    config["llm"]["api_key"] = "***" if cfg.llm.api_key else ""  # never written
    return config


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    wr = report["win_rate"]
    lc = wr["length_controlled"]
    title = f"{report['model']} vs {report['against']}: {report['judge']} judge, {report['n']} prompts, both orders"
    table = Table(title=title, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    table.add_row("win rate [95% CI]", f"{pct(wr['win_rate'])} [{pct(wr['low'])}, {pct(wr['high'])}]")
    table.add_row("wins / ties / losses", f"{wr['wins']} / {wr['ties']} / {wr['losses']}")
    table.add_row("position consistency", pct(wr["position_consistency"]))
    if lc is not None:
        note = " (extrapolated: one side was longer in every pair)" if lc["extrapolated"] else ""
        table.add_row("length-controlled win rate", f"{pct(lc['win_rate'])} [{pct(lc['low'])}, {pct(lc['high'])}]{note}")
    for key, side in report["sides"].items():
        eos = "-" if side["eos_fraction"] is None else pct(side["eos_fraction"])
        line = f"{side['mean_tokens']:.1f} tokens, EOS {eos}"
        if "gold_score" in side:
            line += f", gold {side['gold_score']:.3f}"
        table.add_row(f"{key}: {side['name']}", line)
    if report["kl"] is not None:
        mean = report["kl"]["mean"]
        table.add_row("KL(model || against), k1", "-" if mean is None else f"{mean:.3f} nats")
    if "llm_judge" in report:
        table.add_row("LLM judge: unparseable answers", f"{report['llm_judge']['unparseable']} of "
                      f"{2 * report['n']} (counted as ties)")
    if "rm_accuracy" in report:
        acc = report["rm_accuracy"]
        line = f"{pct(acc['accuracy'])} of {acc['pairs']} pairs"
        if "gold_accuracy" in acc:
            line += f" (gold order: {pct(acc['gold_accuracy'])})"
        table.add_row(f"RM accuracy on {acc['source']}", line)
    console = Console()
    console.print(table)
    if report["kl"] is not None and report["kl"]["note"]:
        console.print(f"KL note: {report['kl']['note']}")
