"""cli.main: exactly `FreeAnchorError` becomes one line and its exit code; anything else is a
bug and keeps its traceback."""

from __future__ import annotations

import pytest

import freeanchor.cli as cli
from freeanchor.errors import ImageReadError, TrainingDivergedError


def _command(exc: BaseException):
    def run(args):
        raise exc

    return run


@pytest.mark.parametrize(
    "exc, code",
    [(ImageReadError("a.jpg: not an image\nsecond line"), 2), (TrainingDivergedError("nan"), 1)],
)
def test_user_errors_are_one_line_with_their_exit_code(exc, code, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_lazy", lambda module, name: _command(exc))
    assert cli.main(["predict", "--weights", "w", "x.jpg"]) == code
    err = capsys.readouterr().err
    assert err.splitlines() == [f"freeanchor predict: error: {str(exc).splitlines()[0]}"]


@pytest.mark.parametrize("exc", [ValueError("a bug"), FileNotFoundError("also a bug")])
def test_other_exceptions_keep_their_traceback(exc, monkeypatch):
    monkeypatch.setattr(cli, "_lazy", lambda module, name: _command(exc))
    with pytest.raises(type(exc)):
        cli.main(["predict", "--weights", "w", "x.jpg"])


def test_max_pixels_option_on_predict_and_eval():
    parser = cli.build_parser()
    args = parser.parse_args(["predict", "--weights", "w", "x.jpg", "--max-pixels", "1000"])
    assert args.max_pixels == 1000
    args = parser.parse_args(["eval", "--weights", "w", "--ann", "a", "--images", "i"])
    assert args.max_pixels == 89_478_485
