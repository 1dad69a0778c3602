"""The result spool keeps every Result until its ack, across restarts and torn writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from maw.agent.v1 import agent_service_pb2 as pb
from maw.common.v1 import work_pb2
from maw_agent import _spool
from maw_agent._spool import ResultSpool


def result(name: str, attempt: int = 1) -> pb.Result:
    return pb.Result(
        lease=pb.Lease(subtask=f"tasks/t/subtasks/{name}", attempt=attempt),
        outcome=work_pb2.OUTCOME_SUCCEEDED,
        output="x" * 100,
    )


def test_results_survive_a_restart_until_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "results.log"
    spool = ResultSpool(path)
    spool.add(result("a"))
    spool.add(result("b"))
    spool.add(result("b", attempt=2))
    spool.sync()
    assert spool.forget(result("a").lease)
    assert not spool.forget(result("never").lease)
    spool.close()
    again = ResultSpool(path)
    assert list(again.pending) == [("tasks/t/subtasks/b", 1), ("tasks/t/subtasks/b", 2)]
    assert again.pending[("tasks/t/subtasks/b", 2)] == result("b", attempt=2)
    again.close()


def test_a_torn_last_record_is_dropped_and_the_file_stays_usable(tmp_path: Path) -> None:
    path = tmp_path / "results.log"
    spool = ResultSpool(path)
    spool.add(result("whole"))
    spool.close()
    with path.open("ab") as handle:
        handle.write(_spool.encode_record(b"R", result("torn").SerializeToString())[:-7])
    spool = ResultSpool(path)
    assert list(spool.pending) == [("tasks/t/subtasks/whole", 1)]
    spool.add(result("after"))
    spool.close()
    assert list(ResultSpool(path).pending) == [("tasks/t/subtasks/whole", 1), ("tasks/t/subtasks/after", 1)]


def test_flush_asks_for_an_fsync_only_when_results_were_added(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path / "r.log")
    assert spool.flush() is None
    spool.add(result("a"))
    assert isinstance(spool.flush(), int)
    spool.forget(result("a").lease)
    assert spool.flush() is None  # acks need no fsync
    no_sync = ResultSpool(tmp_path / "n.log", fsync=False)
    no_sync.add(result("a"))
    assert no_sync.flush() is None


def test_compaction_keeps_exactly_the_pending_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.log"
    spool = ResultSpool(path)
    for index in range(300):
        spool.add(result(f"r{index}"))
    for index in range(0, 300, 3):
        spool.forget(result(f"r{index}").lease)
    before = path.stat().st_size
    monkeypatch.setattr(_spool, "_COMPACT_AFTER_BYTES", 1)
    spool.maybe_compact()
    spool.add(result("new"))
    spool.close()
    assert path.stat().st_size < before
    reloaded = ResultSpool(path)
    assert len(reloaded.pending) == 201
    assert ("tasks/t/subtasks/r0", 1) not in reloaded.pending
    assert ("tasks/t/subtasks/new", 1) in reloaded.pending
