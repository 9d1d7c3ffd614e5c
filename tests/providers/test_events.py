"""The run event log: numbered appends, and a follower that sees only whole lines, once."""

from __future__ import annotations

from narrative.store import Store
from providers.events import RunEventLog


def test_follower_reads_whole_new_lines_once(store: Store) -> None:
    log = RunEventLog(store, "run-test")
    assert log.read_new() == []  # no log yet
    log.append("run.created")
    log.append("agent.output", data="a")
    assert [e["seq"] for e in log.read_new()] == [1, 2]
    assert log.read_new() == []
    with open(log.path, "ab") as f:  # an append caught half way
        f.write(b'{"seq":3,"type":"agent.outp')
    assert log.read_new() == []
    with open(log.path, "ab") as f:
        f.write(b'ut","time":"t"}\n')
    assert [e["seq"] for e in log.read_new()] == [3]
    assert [e["type"] for e in log.read(since=1)] == ["agent.output", "agent.output"]
