"""narrative.plain records behave like the dataclasses they replaced."""

from __future__ import annotations

import copy
import pickle

import pytest

from narrative.merge_result import Conflict, TreeMerge
from narrative.objects import Commit, Signature
from narrative.storeconfig import StoreConfig


def test_frozen_records_are_values() -> None:
    sig = Signature("a", "a@x", 1, offset=60)
    same = Signature(name="a", email="a@x", time=1, offset=60)
    assert sig == same and hash(sig) == hash(same) and sig != Signature("a", "a@x", 1)
    assert repr(sig) == "Signature(name='a', email='a@x', time=1, offset=60)"
    field = "name"
    with pytest.raises(AttributeError):
        setattr(sig, field, "b")
    with pytest.raises(AttributeError):
        delattr(sig, field)
    commit = Commit(b"t" * 20, (b"p" * 20,), sig, sig, "m\n")
    for clone in (copy.copy(commit), copy.deepcopy(commit), pickle.loads(pickle.dumps(commit))):
        assert clone == commit and clone.author == sig
    conflict = Conflict("p", "content", None, (0o100644, b"o" * 20), None, markers=True)
    assert {conflict, copy.deepcopy(conflict)} == {conflict}
    assert conflict.replace(kind="binary").kind == "binary" and conflict.kind == "content"


def test_mutable_records_compare_but_do_not_hash() -> None:
    config = StoreConfig("/ws", max_file_size=5)
    changed = config.replace(workspace_id="w")
    assert changed.workspace_id == "w" and config.workspace_id == "" and changed != config
    assert changed.replace(workspace_id="") == config
    config.max_file_size = 6
    assert config.max_file_size == 6
    with pytest.raises(TypeError):
        hash(config)
    with pytest.raises(TypeError):
        config.replace(nope=1)
    assert TreeMerge(b"t") == TreeMerge(b"t", {}, [], [], [])
