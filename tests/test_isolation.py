"""No test, and no fixture wider than one test, reaches the developer's own data directory
(where stores live by default) or HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

from narrative.location import data_dir

REAL_HOME = Path("~").expanduser()  # evaluated at import, before any fixture


@pytest.fixture(scope="module")
def module_data_dir() -> str:
    return data_dir()


def test_a_module_scoped_fixture_sees_a_private_data_directory(
    module_data_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.getbasetemp()
    assert Path(module_data_dir).is_relative_to(base), module_data_dir
    assert not Path(module_data_dir).is_relative_to(REAL_HOME / ".local")
