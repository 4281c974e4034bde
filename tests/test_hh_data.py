"""The hh-rlhf reader on the real Anthropic test splits that live beside the project.

The files are not in the repository (see ../shared/data/hh-rlhf/README.md); the tests that read
them skip when the folder is absent. The hh recipe names them as `{project}/../shared/...`: the
tests of that lookup run without the data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfkit.cli import main
from rlhfkit.config import load_recipe_section
from rlhfkit.data import formats
from rlhfkit.data.formats import Format, read_comparisons, read_records, resolve_source
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


# --- the hh recipe's `{project}/` paths --------------------------------------------------------


def test_project_root_is_this_checkout():
    assert formats.project_root() == Path(__file__).resolve().parents[1]


def test_recipe_paths_find_the_data_beside_the_checkout_from_any_folder(tmp_path, monkeypatch):
    """`rlhfkit run hh` from another folder reads the same file: ../shared beside the checkout,
    not beside the current folder."""
    if not HH_DIR.is_dir():
        pytest.skip(f"hh-rlhf data not found at {HH_DIR}; it lives beside the project, not in it")
    monkeypatch.chdir(tmp_path)
    sources = {load_recipe_section("hh", section)["data"]["train"] for section in ("sft", "rm", "dpo")}
    assert sources == {"{project}/../shared/data/hh-rlhf/helpful-base.jsonl.gz"}
    assert resolve_source(sources.pop()) == (HH_DIR / "helpful-base.jsonl.gz").resolve()
    pairs, report = read_comparisons("{project}/../shared/data/hh-rlhf/helpful-base.jsonl.gz", skip_bad=True)
    assert len(pairs) == 1847 and report.path == str((HH_DIR / "helpful-base.jsonl.gz").resolve())


@pytest.fixture
def fake_project(tmp_path, monkeypatch):
    """A checkout at tmp/proj and a current folder at tmp/work/here, neither holding data yet."""
    project, here = tmp_path / "proj", tmp_path / "work" / "here"
    project.mkdir()
    here.mkdir(parents=True)
    monkeypatch.setattr(formats, "project_root", lambda: project)
    monkeypatch.chdir(here)
    return project, here


def put(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}\n')
    return path


def test_project_path_wins_over_the_current_folder(fake_project):
    project, here = fake_project
    beside_project = put(project.parent / "shared" / "prefs.jsonl")
    put(here.parent / "shared" / "prefs.jsonl")
    assert resolve_source("{project}/../shared/prefs.jsonl") == beside_project.resolve()


def test_falls_back_to_the_current_folder(fake_project):
    _, here = fake_project
    put(here.parent / "shared" / "prefs.jsonl")
    assert resolve_source("{project}/../shared/prefs.jsonl") == Path("../shared/prefs.jsonl")
    pairs, _ = read_comparisons("{project}/../shared/prefs.jsonl")
    assert [p.chosen for p in pairs] == ["Hello!"]


def test_other_sources_are_left_alone(fake_project):
    assert resolve_source("../shared/prefs.jsonl") == "../shared/prefs.jsonl"
    assert resolve_source("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"


def test_missing_data_names_both_paths_and_where_to_get_it(fake_project, tmp_path, capsys):
    project, _ = fake_project
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--recipe", "hh", "--model.name", "tiny", "--run.out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"relative to the project checkout ({(project / '../shared/data/hh-rlhf/helpful-base.jsonl.gz').resolve()})" in err
    assert "from the current folder (../shared/data/hh-rlhf/helpful-base.jsonl.gz)" in err
    assert "github.com/anthropics/hh-rlhf" in err and "--data.train" in err
    assert not (tmp_path / "out").exists()
