import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # so the suite also runs from a plain checkout
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhfkit.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def imperfect_sft(tmp_path_factory) -> Path:
    """A tiny SFT policy trained on imperfect demonstrations (half chatty, off-format or rambling,
    as real demonstration data is): there is style for preference learning to improve on. Shared
    by the PPO, DPO, online-DPO and GRPO learning tests."""
    from rlhfkit.cli import parse
    from rlhfkit.train import sft

    out = tmp_path_factory.mktemp("imperfect") / "sft"
    return sft.train(parse("sft", ["--recipe", "tiny", "--data.world-imperfect", "0.5", "--eval.gold-prompts", "0",
                                   "--run.out", str(out)]))


@pytest.fixture(scope="session")
def tiny_mixed_rm(imperfect_sft, tmp_path_factory) -> Path:
    """A reward model from the RM stage: the imperfect SFT backbone trained on simulated labelers'
    rankings of its own samples mixed with the world's synthetic candidates (held-out gold-order
    accuracy ~0.68). Shared by the PPO, GRPO and online-DPO learning tests."""
    from rlhfkit.cli import parse
    from rlhfkit.train import rm

    out = tmp_path_factory.mktemp("mixed_rm") / "rm"
    return rm.train(parse("rm", ["--recipe", "tiny", "--model.name", str(imperfect_sft), "--data.responses", "mixed",
                                 "--data.world-prompts", "300", "--data.world-eval-prompts", "0", "--run.steps", "60",
                                 "--run.out", str(out)]))
