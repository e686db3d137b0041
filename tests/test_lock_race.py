"""The shard writer lock under a race: writers that start at the same instant, many times over.

Processes meet at a barrier, then all take the lock of one writer slot at once; whoever gets it
counts itself in a shared counter while it holds it. Two in at once would be two writers of the same
shards. The rounds start from each state a cache's lock folder can be in: no lock file, a lock file
left by a writer that died, and an empty one (a writer killed between creating it and writing its
owner line). The single-writer cases (a live holder stops a second, a dead one's lock is taken over,
another host's is respected) are below and in test_extract.py and test_integrity.py.
"""
import json
import multiprocessing as mp
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.cache import WriterLock, live_locks

N_PROCS = 4
ROUNDS = 1000


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def _set_state(lock: Path, state: str, dead_pid: int) -> None:
    lock.unlink(missing_ok=True)
    if state == "stale":
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "since": "x"}))
    elif state == "empty":
        lock.write_text("")


def _contend(me, lock, barrier, inside, overlaps, wins, refusals, dead_pid):
    from shared.errors import BadInput
    lock = Path(lock)
    # no riding out a holder: every loser is refused at once, so the contention is all at the start
    WriterLock.RETRY_SECONDS = 0.0
    states = ("none", "stale", "empty")
    for r in range(ROUNDS):
        if me == 0:
            _set_state(lock, states[r % 3], dead_pid)
        barrier.wait(timeout=60)             # everyone starts at the same instant
        try:
            with WriterLock(lock):
                with inside.get_lock():
                    inside.value += 1
                    if inside.value > 1:
                        overlaps.value += 1
                # hold it long enough that a second holder, if the lock let one in, would overlap
                time.sleep(0.003)
                # a writer that holds the lock sees its own lock among the live ones
                assert lock in live_locks(lock.parent)
                with inside.get_lock():
                    inside.value -= 1
                with wins.get_lock():
                    wins.value += 1
        except BadInput as e:
            assert "another extraction is writing here" in str(e), str(e)
            with refusals.get_lock():
                refusals.value += 1
        barrier.wait(timeout=60)             # the round is over before the next state is set


def test_writers_starting_at_the_same_instant_never_both_hold_the_lock(tmp_path):
    ctx = mp.get_context("spawn")            # no fork of the test process (its threads, torch)
    barrier = ctx.Barrier(N_PROCS)
    inside, overlaps = ctx.Value("i", 0), ctx.Value("i", 0)
    wins, refusals = ctx.Value("i", 0), ctx.Value("i", 0)
    lock = tmp_path / "locks" / "writer-0-of-1.lock"
    lock.parent.mkdir()
    dead = _dead_pid()
    procs = [ctx.Process(target=_contend, args=(i, str(lock), barrier, inside, overlaps, wins, refusals, dead))
             for i in range(N_PROCS)]
    t0 = time.time()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():                     # a stuck writer must fail the test, not hang make test
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    print(f"{ROUNDS} rounds x {N_PROCS} writers in {time.time() - t0:.1f}s: {wins.value} held the lock, "
          f"{refusals.value} refused, {overlaps.value} overlaps")
    assert overlaps.value == 0                       # never two writers of one slot
    assert wins.value + refusals.value == ROUNDS * N_PROCS
    assert wins.value >= ROUNDS                      # every round someone wrote: no lock held by nobody
    assert not lock.exists()                         # the last holder removed its lock


@pytest.mark.parametrize("state", ["stale", "empty"])
def test_a_dead_writers_lock_is_taken_over_once(tmp_path, state):
    """Of two writers that both find a dead writer's lock, one takes it over and the other is told."""
    lock = tmp_path / "w.lock"
    _set_state(lock, state, _dead_pid())
    with WriterLock(lock):
        assert json.loads(lock.read_text())["pid"] != 0
        with pytest.raises(Exception, match="another extraction is writing here"):
            with WriterLock(lock):
                pass
        assert lock in live_locks(tmp_path)
    assert not lock.exists() and live_locks(tmp_path) == {}


def test_a_lock_naming_another_host_is_respected(tmp_path):
    """Its owner cannot be seen from here (and flock may not reach across hosts): refuse, and list it live."""
    lock = tmp_path / "w.lock"
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "since": "x"}))
    with pytest.raises(Exception, match="host node-elsewhere, pid 1") as e:
        with WriterLock(lock):
            pass
    assert "delete the lock file" in str(e.value)
    assert lock.exists() and live_locks(tmp_path) == {lock: {"host": "node-elsewhere", "pid": 1, "since": "x"}}
