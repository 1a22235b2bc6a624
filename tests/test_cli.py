"""`metrion SUBCOMMAND`: the one command dispatches to the same code as the metrion-* aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from metrion_addon.cli import SUBCOMMANDS, main


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "proxy" in capsys.readouterr().err


def test_unknown_subcommand_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_subcommands_run_their_own_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert set(SUBCOMMANDS) >= {"proxy", "report", "reprice", "reconcile"}
    assert main(["report", "--db", str(tmp_path / "missing.db")]) == 3  # the report's "no database" code
    assert "no database" in capsys.readouterr().err
    assert main(["reprice", "--db", str(tmp_path / "missing.db")]) == 2
    assert "no such database" in capsys.readouterr().err
