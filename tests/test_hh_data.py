"""The hh-rlhf reader on the real Anthropic test splits that live beside the project.

The files are not in the repository (see ../shared/data/hh-rlhf/README.md); these tests skip when
the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfkit.data.formats import Format, read_comparisons, read_records
from rlhfkit.errors import DataError

HH_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf"

# Pair counts from the data's README.
README_PAIRS = {
    "helpful-base.jsonl.gz": 1854,
    "helpful-online.jsonl.gz": 1137,
    "helpful-rejection-sampled.jsonl.gz": 2749,
}


@pytest.fixture(scope="module")
def hh_reads():
    if not HH_DIR.is_dir():
        pytest.skip(
            f"hh-rlhf data not found at {HH_DIR}; it lives beside the project, not in it "
            "(see the project README) and these tests need it"
        )
    reads = {name: read_comparisons(HH_DIR / name, skip_bad=True) for name in README_PAIRS}
    for _, report in reads.values():
        print(report.summary())
    return reads


@pytest.mark.parametrize("name", list(README_PAIRS))
def test_every_pair_is_accounted_for(hh_reads, name):
    pairs, report = hh_reads[name]
    assert report.format is Format.HH and report.records == len(pairs)
    assert report.records + report.dropped_identical + report.skipped_bad == README_PAIRS[name]
    assert report.records >= 0.98 * README_PAIRS[name]
    # The README's rates: a few identical pairs, about 1 in 1,000 prefix mismatches.
    assert report.skipped_bad <= 0.005 * README_PAIRS[name]
    assert report.resplit_prefix_mismatch <= 0.005 * README_PAIRS[name]


def test_known_defects_are_found(hh_reads):
    total = lambda attr: sum(getattr(report, attr) for _, report in hh_reads.values())  # noqa: E731
    assert total("dropped_identical") >= 10
    assert 1 <= total("resplit_prefix_mismatch") <= 20


@pytest.mark.parametrize("name", list(README_PAIRS))
def test_comparisons_are_well_formed(hh_reads, name):
    pairs, _ = hh_reads[name]
    for pair in pairs:
        assert pair.prompt and pair.prompt[-1].role == "user"
        assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
        assert not pair.chosen.startswith(" ") and "\n\nAssistant:" not in pair.chosen


def test_long_multi_turn_conversations_are_kept(hh_reads):
    user_turns = [
        sum(m.role == "user" for m in pair.prompt) for pairs, _ in hh_reads.values() for pair in pairs
    ]
    assert max(user_turns) >= 20
    assert sum(turns > 1 for turns in user_turns) > 0.3 * len(user_turns)


def test_strict_read_stops_at_the_first_malformed_pair(hh_reads):
    with pytest.raises(DataError, match=r"helpful-base\.jsonl\.gz, line 524: field 'chosen': "):
        read_records(HH_DIR / "helpful-base.jsonl.gz")


def test_the_folder_reads_as_one_source(hh_reads):
    pairs, report = read_comparisons(HH_DIR, skip_bad=True)
    assert len(pairs) == sum(len(p) for p, _ in hh_reads.values())
    assert report.path == str(HH_DIR)
