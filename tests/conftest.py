import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # so the suite also runs from a plain checkout
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RLHFKIT_PRECISION", "fp32")  # `precision: auto` stays fp32 here, on every CPU (tests/test_precision.py tests auto)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhfkit.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """`rlhfkit run tiny`, once per session: SFT on imperfect demonstrations (half chatty,
    off-format or rambling, as real demonstration data is) -> simulated labels of SFT samples mixed
    with the world's synthetic candidates -> reward model -> PPO -> evaluation -> report. Its SFT
    and RM are the starting points of the DPO, online-DPO and GRPO learning tests."""
    from rlhfkit.cli import parse
    from rlhfkit.pipeline import run

    # Resume checkpoints kept, so a test can resume from them (by default a finished stage's go).
    return run(parse("run", ["tiny", "--runs-dir", str(tmp_path_factory.mktemp("runs")), "--name", "tiny",
                             "--set", "pipeline.keep_checkpoints=true"]))


@pytest.fixture(scope="session")
def imperfect_sft(tiny_run) -> Path:
    """The tiny pipeline's SFT policy: there is style for preference learning to improve on."""
    return tiny_run / "sft"


@pytest.fixture(scope="session")
def tiny_mixed_rm(tiny_run) -> Path:
    """The tiny pipeline's reward model: the SFT backbone trained on simulated labelers' rankings
    of its own samples mixed with the world's synthetic candidates (held-out accuracy ~0.67)."""
    return tiny_run / "rm"
