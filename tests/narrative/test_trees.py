"""Reading a whole tree (:func:`narrative.trees.flatten_tree`) against a plain recursive reading
with the path rule applied to each full path: same files in the same order, or UnsafePath
exactly when some name is refused where it stands, whatever names recur at which depths (the
reader remembers names that passed below the top)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from narrative.errors import UnsafePath
from narrative.objects import (
    MODE_DIR,
    MODE_EXEC,
    MODE_FILE,
    encode_tree,
    hash_object,
    parse_tree,
)
from narrative.odb import PackWriter
from narrative.paths import component_problem
from narrative.store import Store
from narrative.trees import flatten_tree
from tests.properties import examples

# names fine everywhere ("-" sorts before ".narrative": a directory read before it), fine only
# below the top, refused everywhere, or holding a slash
NAMES = ["-", "a", "b", "README.md", ".narrative", ".git", ".GIT", "git~1", "x/y", "..", "é"]

Node = dict[str, Any]  # name -> Node (a directory) or bytes (a file's content)

nodes = st.recursive(
    st.binary(max_size=8),
    lambda children: st.dictionaries(st.sampled_from(NAMES), children, max_size=4),
    max_leaves=12,
)


def _write(writer: PackWriter, node: Node) -> bytes:
    entries = []
    for name, child in node.items():
        raw = name.encode()
        if isinstance(child, dict):
            entries.append((raw, MODE_DIR, _write(writer, child)))
        else:
            mode = MODE_EXEC if len(child) % 2 else MODE_FILE
            entries.append((raw, mode, writer.add_raw("blob", child)))
    return writer.add_raw("tree", encode_tree(entries))


def _expected(node: Node, at: str, out: dict[str, tuple[int, bytes]]) -> bool:
    """Files below ``node`` in tree order; False when a name is refused where it stands."""
    listing = [
        (n.encode(), MODE_DIR if isinstance(c, dict) else MODE_FILE, b"\0" * 20)
        for n, c in node.items()
    ]
    for raw, _mode, _oid in parse_tree(
        encode_tree(listing)
    ):  # git's order: a directory sorts as "name/"
        name = raw.decode()
        child = node[name]
        if "/" in name or component_problem(name, top_level=not at) is not None:
            return False
        if isinstance(child, dict):
            if not _expected(child, f"{at}{name}/", out):
                return False
        else:
            out[at + name] = (
                MODE_EXEC if len(child) % 2 else MODE_FILE,
                hash_object("blob", child),
            )
    return True


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(root=st.dictionaries(st.sampled_from(NAMES), nodes, max_size=5))
@example(root={"-": {".narrative": b"x"}, ".narrative": b"y"})  # passed below, then at the top
def test_a_tree_reads_as_the_plain_recursive_reading_does(store: Store, root: Node) -> None:
    writer = PackWriter(store.odb)
    tree = _write(writer, root)
    writer.publish()
    expected: dict[str, tuple[int, bytes]] = {}
    if _expected(root, "", expected):
        got = flatten_tree(store.odb, tree)
        assert list(got.items()) == list(expected.items())
    else:
        with pytest.raises(UnsafePath):
            flatten_tree(store.odb, tree)
