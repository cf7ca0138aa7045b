"""The one-line error contract of the scripts, shared by the tests: bad input exits with status 2 and prints exactly
one line, starting with "error: ", on stderr (no traceback)."""

import pytest

from dsa.train_utils import cli


def one_line_error(main, argv: list[str], capsys) -> str:
    """Run main(argv) as its script would (`cli`), expect exit status 2; returns the error line."""
    with pytest.raises(SystemExit) as exit_info:
        cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err
