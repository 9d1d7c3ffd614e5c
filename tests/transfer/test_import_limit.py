"""The import size limit is a store setting (``narrative config max_import_size``, default
4 GiB): a bundle or archive that would expand past it is refused with one line, exit 1, and
the store stays byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cli, store_dir_of, tree_bytes


@pytest.mark.parametrize("fmt", ["bundle", "tar.gz"])
def test_an_import_over_the_configured_limit_is_refused(tmp_path: Path, fmt: str) -> None:
    sender_ws, receiver_ws = tmp_path / "sender", tmp_path / "receiver"
    sender_ws.mkdir()
    receiver_ws.mkdir()
    sender, receiver = Cli(sender_ws), Cli(receiver_ws)
    sender.run("init")
    (sender_ws / "big.bin").write_bytes(bytes(range(256)) * (8 << 10))  # 2 MiB
    sender.run("snapshot", "-m", "big")
    artifact = tmp_path / f"out.{fmt}"
    sender.run("export", str(artifact), "--format", fmt)
    receiver.run("init")
    assert receiver.json("config", "max_import_size")["max_import_size"] == 4 << 30
    receiver.run("config", "max_import_size", "1M")
    before = tree_bytes(store_dir_of(receiver_ws))
    refused = receiver.run("import", str(artifact), check=False)
    assert refused.returncode == 1, refused
    assert "limit" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert tree_bytes(store_dir_of(receiver_ws)) == before
    receiver.run("config", "max_import_size", "4M")
    receiver.run("import", str(artifact))
