"""`python -m model` driven in-process, as the model package's refusal tests drive it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from model.__main__ import main


def refused(capsys: pytest.CaptureFixture[str], argv: Sequence[str], *words: str) -> str:
    """The one-line error `main(argv)` exits 2 with, checked to hold `words`."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err
