"""The benchmark driver's table and gate (bench/run_all.py) on results written by hand: a gated
row worse than 1.5x its goal fails ``--gate``, a known miss outside GATED does not, a row that
produced no samples fails, and Docker rows without DOCKER_HOST say so."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def run_all(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCH))
    import run_all as module

    yield module
    for name in ("run_all", "common"):
        sys.modules.pop(name, None)


def _write(results: Path, bench: str, rows: list[dict[str, Any]]) -> None:
    (results / f"{bench}.json").write_text(json.dumps({"benchmark": bench, "rows": rows}))


def test_gate_fails_only_gated_rows_beyond_one_and_a_half_times_their_goal(
    run_all: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    # history: goal 2x, fastest ratio 2.9x (within 1.5x the goal); startup: goal 3x, 5x
    _write(tmp_path, "history", [{"key": "total", "ours": [2.9, 3.5], "anchor": [1.0, 1.2]}])
    _write(tmp_path, "startup", [{"key": "startup", "ours": [0.5, 0.6], "anchor": [0.1, 0.1]}])
    argv = ["--quick", "--gate", "--only", "history,startup", "--from-dir", str(tmp_path)]

    assert run_all.main([*argv, "--gated", "history"]) == 0
    out = capsys.readouterr().out
    assert "history: ok" in out and "startup: not gated (known miss)" in out

    assert run_all.main([*argv, "--gated", "history,startup"]) == 1
    assert "bench gate FAILED: startup" in capsys.readouterr().out


def test_missing_samples_fail_a_gated_row_and_docker_rows_say_why_they_were_skipped(
    run_all: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    _write(tmp_path, "run", [{"key": "worktree", "label": "x", "error": "it broke"}])
    argv = ["--gate", "--only", "run", "--from-dir", str(tmp_path), "--gated", "run-worktree"]
    assert run_all.main(argv) == 1
    out = capsys.readouterr().out
    assert "run-worktree: FAIL: error" in out and "it broke" in out
    assert "skipped: no DOCKER_HOST" in out
