"""Event logs: the hub's numbered appends and a follower that sees only whole lines, once; the
runtime's events in bounded memory with the rest spilled to a file."""

from __future__ import annotations

from pathlib import Path

from gateway.hub.events import RunEventLog, RuntimeEvents
from narrative.store import Store


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


def test_runtime_events_spill_old_events_to_their_file(tmp_path: Path) -> None:
    events = RuntimeEvents(str(tmp_path / "rt" / "events.jsonl"), keep=3)
    assert events.since(0) == []
    for i in range(10):
        events.append({"type": "agent.output", "data": f"line-{i}"})
    assert len(events._recent) == 3  # only the newest stay in memory
    assert [e["rseq"] for e in events.since(0)] == list(range(1, 11))  # older ones from the file
    assert [e["rseq"] for e in events.since(8)] == [9, 10]  # from memory
    assert [e["rseq"] for e in events.since(2, limit=4)] == [3, 4, 5, 6]
    assert [e["data"] for e in events.since(6, limit=2)] == ["line-6", "line-7"]
    assert events.since(10) == [] and events.since(99) == []
    with open(events.path, "ab") as f:  # a torn line from a crash mid-append is skipped
        f.write(b'{"rseq":11,"type":"agent.ou')
    assert [e["rseq"] for e in events.since(0)] == list(range(1, 11))
    # the next run of a reused runtime numbers from 1 again, in a fresh file
    again = RuntimeEvents(events.path, keep=3)
    again.append({"type": "agent.started"})
    assert [e["type"] for e in again.since(0)] == ["agent.started"]
