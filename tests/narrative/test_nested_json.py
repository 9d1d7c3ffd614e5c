"""Deeply nested JSON from outside is one clear error, never a RecursionError traceback.

Covers records in the metadata ref, gateway frames and the gateway config file (archive
manifests and bundle records are covered in tests/transfer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.protocol import parse_message
from narrative.errors import NarrativeError
from narrative.meta import META_REF
from narrative.objects import MODE_DIR, MODE_FILE, Commit, Signature, encode_commit, encode_tree
from narrative.store import Store

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_nested_metadata_record_is_a_clear_error(store: Store) -> None:
    blob = store.odb.write_loose("blob", DEEP)
    threads = store.odb.write_loose(
        "tree", encode_tree([(b"th-0000000000000000000000.json", MODE_FILE, blob)])
    )
    root = store.odb.write_loose("tree", encode_tree([(b"threads", MODE_DIR, threads)]))
    sig = Signature("x", "x@example.com", 1_700_000_000)
    meta = store.odb.write_loose("commit", encode_commit(Commit(root, (), sig, sig, "records")))
    store.refs.update(META_REF, meta)
    with pytest.raises(NarrativeError, match="not JSON"):
        store.meta.all("threads")


def test_nested_gateway_frame_is_a_protocol_error() -> None:
    with pytest.raises(NarrativeError):
        parse_message(DEEP)


def test_nested_gateway_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "proxyExecution.json"
    path.write_bytes(DEEP)
    with pytest.raises(NarrativeError):
        load_config(path)


def test_a_nested_remote_index_is_one_line_exit_1(tmp_path: Path) -> None:
    """The remote's index comes from whoever can write the bucket."""
    from tests.conftest import Cli, store_dir_of, tree_bytes

    remote, ws = tmp_path / "remote", tmp_path / "ws"
    remote.mkdir()
    ws.mkdir()
    from transfer.publishing import write_small_atomic

    write_small_atomic(str(remote / "index.json"), DEEP)  # published, with its sidecar
    cli = Cli(ws)
    cli.run("init")
    cli.run("remote", "add", "origin", str(remote))
    before = tree_bytes(store_dir_of(ws))
    for command in ("fetch", "pull", "push"):
        proc = cli.run(command, "origin", check=False)
        assert proc.returncode == 1, (command, proc)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert tree_bytes(store_dir_of(ws)) == before


def test_a_nested_token_payload_is_refused() -> None:
    """A token arrives from the network before anything about it is verified."""
    import base64

    from gateway.tokens import token_audience

    body = base64.urlsafe_b64encode(DEEP).rstrip(b"=").decode()
    assert token_audience(f"ng2.{body}.sig") is None


def test_every_json_reader_goes_through_parse_json() -> None:
    """The class of bug: a reader that calls json.load(s) directly and catches only
    ValueError lets a nested document through as a RecursionError traceback."""
    import ast

    root = Path(__file__).resolve().parents[2]
    direct = []
    for package in ("narrative", "transfer", "providers", "gateway", "cli"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name == "jsonio.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "json"
                    and node.attr in ("load", "loads")
                ):
                    direct.append(f"{path.relative_to(root)}:{node.lineno}")
    assert direct == [], f"parse with narrative.jsonio instead: {direct}"
