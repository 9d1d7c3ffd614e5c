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
