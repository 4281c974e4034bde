"""A user's mistake at the command line: exit 2 and one line of error, no traceback."""

import pytest

from rlhfkit.cli import COMMANDS, main


def refused(argv: list[str], capsys) -> str:
    """The CLI's one-line error, last on stderr (the line a user reads), after exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    command = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0]  # `rm score`, `label serve`
    assert last.startswith(f"rlhfkit {command}: error: "), last
    return last
