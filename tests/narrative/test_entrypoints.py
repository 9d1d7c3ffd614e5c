"""Installed entry points are listed once per ``sys.path`` (a runtime forked per run inherits
the list its warm runtime made) and a new path is read when asked about."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from narrative import entrypoints


def test_listed_once_per_path_and_read_again_for_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, ...]] = []
    real = importlib.metadata.entry_points

    def counting() -> object:
        calls.append(tuple(sys.path))
        return real()

    monkeypatch.setattr(entrypoints.importlib.metadata, "entry_points", counting)
    monkeypatch.setattr(entrypoints, "_LISTED", {})
    assert not list(entrypoints.entry_points_in("narrative.test-nothing"))
    entrypoints.entry_points_in("narrative.providers")
    assert len(calls) == 1
    dist = tmp_path / "late_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: late-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[narrative.test-late]\nlate = late_plugin:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [ep.name for ep in entrypoints.entry_points_in("narrative.test-late")] == ["late"]
    assert len(calls) == 2
