"""The in-process executor's scheduling, measuring and bookkeeping, on fake workers (no model):
threads take batches from a slower thread's queue, every in-process worker measures at once
on a thread of its own, the garbage collector leaves the objects alive before a merge alone
while it runs, and the resume manifest skips the shards the very last batch finished."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from raymerge.runtime import executor
from raymerge.runtime.recovery import ShardTracker
from raymerge.runtime.worker import BatchStats

BIG = 100 * 1024 * 1024  # above executor.BATCH_BYTES: every item is a batch of its own


def _item(name: str, shard: str = "s.safetensors") -> SimpleNamespace:
    return SimpleNamespace(name=name, bytes_in=BIG, target=SimpleNamespace(filename=shard))


class _FakeWorker:
    def __init__(self, index: int, delay: float, log: list):
        self.index, self.delay, self.log = index, delay, log

    def merge_run(self, batch):
        self.log.append((self.index, [item.name for item in batch], gc.get_freeze_count()))
        time.sleep(self.delay)
        return BatchStats(self.index, len(batch), BIG * len(batch), 0, self.delay, 0, 0)


class _FakePool:
    remote = False

    def __init__(self, workers: list):
        self.workers = workers

    def __len__(self) -> int:
        return len(self.workers)


def _pool(*delays: float) -> tuple[_FakePool, list]:
    log: list = []
    return _FakePool([_FakeWorker(i, d, log) for i, d in enumerate(delays)]), log


def test_an_idle_thread_takes_the_last_batches_of_a_busy_one_and_every_part_runs_once():
    pool, log = _pool(0.2, 0.0)
    queues = [[_item(f"a{i}") for i in range(5)], [_item("b0")]]
    stats = executor._run_local(pool, queues, 6, quiet=True)
    ran = sorted(name for _, names, _ in log for name in names)
    assert ran == sorted(["a0", "a1", "a2", "a3", "a4", "b0"])
    taken = [names for worker, names, _ in log if worker == 1 and names != ["b0"]]
    assert taken and stats.stolen_parts == sum(len(n) for n in taken)
    # taken from the back of the busy queue; the busy thread kept its own order from the front
    assert taken[0] == ["a4"]
    own = [names[0] for worker, names, _ in log if worker == 0]
    assert own == sorted(own) and own[0] == "a0"


def test_a_worker_planned_no_part_still_takes_batches():
    pool, log = _pool(0.2, 0.0)
    stats = executor._run_local(pool, [[_item(f"a{i}") for i in range(4)], []], 4, quiet=True)
    assert sorted(name for _, names, _ in log for name in names) == ["a0", "a1", "a2", "a3"]
    assert any(worker == 1 for worker, _, _ in log) and stats.stolen_parts > 0


def test_the_merge_threads_run_with_the_collector_frozen_and_it_is_restored():
    assert gc.get_freeze_count() == 0
    pool, log = _pool(0.0, 0.0)
    executor._run_local(pool, [[_item("a")], [_item("b")]], 2, quiet=True)
    assert all(frozen > 0 for _, _, frozen in log)
    assert gc.get_freeze_count() == 0


def test_every_in_process_worker_measures_at_the_same_time_on_its_own_thread():
    pool, _ = _pool(0.0, 0.0, 0.0)
    barrier = threading.Barrier(3, timeout=10)  # breaks unless all three measure at once

    def measure(worker):
        barrier.wait()
        return (worker.index, threading.current_thread().name)

    results = executor._per_actor(pool, measure)
    assert [index for index, _ in results] == [0, 1, 2]
    assert len({name for _, name in results}) == 3


def test_the_shards_of_the_last_batch_are_left_to_the_publish_unless_they_are_sealed(tmp_path: Path):
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(name.encode())
    layout = SimpleNamespace(shards=[SimpleNamespace(filename="a.safetensors", size=13),
                                     SimpleNamespace(filename="b.safetensors", size=13)])
    first, last = [_item("x", "a.safetensors")], [_item("y", "b.safetensors"), _item("z", "b.safetensors")]
    for seal in (None, lambda name: f"sealed {name}"):
        manifest = SimpleNamespace(records=[])
        manifest.record = manifest.records.append
        tracker = ShardTracker(manifest, tmp_path, layout, [first, last], seal=seal)
        tracker.done(first)
        tracker.done(last)
        tracker.close(wait=True)
        recorded = sorted(r.filename for r in manifest.records)
        if seal is None:  # a local output: b is fsynced by the publish that follows at once
            assert recorded == ["a.safetensors"]
        else:  # an upload: every shard is recorded before the publish
            assert recorded == ["a.safetensors", "b.safetensors"]
