"""The run's lease (job/lease.py) on a local path and on S3 (moto's server on loopback, through the real client):
one holder at a time, bounded waits ending in exit code `busy` naming the holder, stale leases taken over, races
between attempts won by exactly one, heartbeats, losing the lease, release."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict

import pytest
from servers import S3Server

from job import lease, lease_backends
from job.errors import CODE_BY_NAME, LeaseHeldError
from job.storage import LocalStorage, S3Storage


@pytest.fixture(scope="module")
def server():
    s3 = S3Server()
    yield s3
    s3.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    """The checkpoint store of one run: a local folder, or an S3 prefix."""
    if request.param == "local":
        return LocalStorage(str(tmp_path / "out" / "run1" / "checkpoints"))
    s3 = request.getfixturevalue("server")
    s3.reset()
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    s3.client().create_bucket(Bucket="results")
    return S3Storage("s3://results/out/run1/checkpoints")


def read(store) -> dict | None:
    found = lease.backend(store).read()
    return None if found is None else asdict(found[0])


def record(attempt: str, heartbeat: float, ttl: float = 30, host: str = "pod") -> lease.Record:
    found = lease.Record("run1", attempt, host, 4242, time.time(), 0, ttl).stamped()
    found.heartbeat = heartbeat
    return found


def test_a_live_lease_makes_the_next_attempt_wait_then_exit_busy(store):
    held = lease.acquire(store, "run1", "a-first", ttl=30, wait=0)
    assert read(store)["attempt"] == "a-first" and not held.waited
    start = time.monotonic()
    with pytest.raises(LeaseHeldError) as e:
        lease.acquire(store, "run1", "a-second", ttl=30, wait=1.5, poll=0.2)
    assert 1.4 < time.monotonic() - start < 10
    assert e.value.exit_code == CODE_BY_NAME["busy"] == 10
    assert "attempt a-first on" in e.value.reason and "FT_LEASE_WAIT_SECONDS=1.5" in e.value.reason
    assert "\n" not in e.value.reason
    held.release()
    assert read(store) is None and store.list() == []


def test_a_released_lease_is_taken_by_the_waiting_attempt(store):
    held = lease.acquire(store, "run1", "a-first", ttl=30, wait=0)
    threading.Timer(0.8, held.release).start()
    second = lease.acquire(store, "run1", "a-second", ttl=30, wait=20, poll=0.1)
    assert second.waited and read(store)["attempt"] == "a-second"
    second.release()


def test_a_stale_lease_is_taken_over_with_a_warning(store, capsys):
    assert lease.backend(store).create(record("a-dead", time.time() - 100, host="gone-pod"))  # killed 100 s ago
    held = lease.acquire(store, "run1", "a-new", ttl=30, wait=0)
    assert read(store)["attempt"] == "a-new"
    out = capsys.readouterr().out
    assert "taking over a stale lease" in out and "gone-pod" in out
    held.release()


def test_a_lease_unchanged_for_its_ttl_is_stale_whatever_its_clock_says(store):
    # The holder's clock is an hour ahead, and it died.
    assert lease.backend(store).create(record("a-fast-clock", time.time() + 3600, ttl=1))
    held = lease.acquire(store, "run1", "a-new", ttl=30, wait=10, poll=0.2)
    assert held.waited and read(store)["attempt"] == "a-new"
    held.release()


@pytest.mark.parametrize("stale", [False, True], ids=["no-lease", "stale-lease"])
def test_racing_attempts_exactly_one_wins(store, stale):
    if stale:
        assert lease.backend(store).create(record("a-dead", 0.0))
    winners, losers, barrier = [], [], threading.Barrier(6)

    def attempt(i: int):
        barrier.wait()
        try:
            winners.append(lease.acquire(store, "run1", f"a-{i}", ttl=30, wait=0))
        except LeaseHeldError:
            losers.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 5
    assert read(store)["attempt"] == winners[0].record.attempt
    winners[0].release()


def test_heartbeats_renew_and_a_taken_over_lease_is_lost(store):
    held = lease.acquire(store, "run1", "a-first", ttl=1, wait=0)
    first = read(store)["heartbeat"]
    time.sleep(1.2)
    assert read(store)["heartbeat"] > first and held.lost is None
    held.check()
    # Another attempt overwrites it (as a take-over after our heartbeats stalled would): the next beat notices.
    ops = lease.backend(store)
    while not ops.replace(record("a-thief", time.time(), host="other-pod"), ops.read()[1]):
        pass  # a heartbeat renewed it between our read and our write: read again
    deadline = time.monotonic() + 10
    while held.lost is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "other-pod" in held.lost
    with pytest.raises(LeaseHeldError, match="stops without publishing"):
        held.check()
    held.release()  # not ours any more: left alone
    assert read(store)["attempt"] == "a-thief"


def test_without_conditional_writes_write_settle_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_backends, "SETTLE_SECONDS", 0.2)
    store = LocalStorage(str(tmp_path / "ckpt"))
    ops = lease.Backend(store)  # the generic protocol, as for a store without conditional writes
    mine = record("a-1", time.time())
    token = ops.create(mine)
    assert token == mine.nonce
    assert ops.create(record("a-2", time.time())) is None
    assert ops.replace(mine.stamped(), "not-the-token") is None
    assert ops.replace(renewed := mine.stamped(), token) == renewed.nonce
    ops.remove(renewed.nonce)
    assert not (tmp_path / "ckpt" / "lease.json").exists()


def test_the_lease_file_is_plain_json_without_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    store = LocalStorage(str(tmp_path / "ckpt"))
    held = lease.acquire(store, "run1", "a-1", ttl=30, wait=0)
    text = (tmp_path / "ckpt" / "lease.json").read_text()
    assert set(json.loads(text)) == {"run_id", "attempt", "host", "pid", "started", "heartbeat", "ttl_s", "nonce", "pid_ns"}
    assert "very-secret" not in text
    held.release()
    assert not (tmp_path / "ckpt").exists()  # no empty folder left behind


def test_an_attempt_that_lost_the_lease_mirrors_no_checkpoint(tmp_path):
    from job.checkpoints import CheckpointStore

    store = LocalStorage(str(tmp_path / "ckpt"))
    held = lease.acquire(store, "run1", "a-first", ttl=30, wait=0)
    checkpoints = CheckpointStore(store, keep=2)
    checkpoints.guard = held.check
    saved = tmp_path / "local" / "checkpoint-2"
    saved.mkdir(parents=True)
    (saved / "adapter_model.safetensors").write_bytes(b"weights")
    held.lost = "the lease at ... was taken over (now held by attempt a-thief)"
    with pytest.raises(LeaseHeldError):
        checkpoints.mirror(saved, 2)
    assert checkpoints.steps() == []
    held.release()


def test_the_live_tensorboard_sync_writes_nothing_once_the_lease_is_lost(tmp_path):
    from job.tbsync import TensorBoardSync

    store, dest, local = LocalStorage(str(tmp_path / "ckpt")), LocalStorage(str(tmp_path / "out")), tmp_path / "tb"
    held = lease.acquire(store, "run1", "a-first", ttl=30, wait=0)
    sync = TensorBoardSync(held.guard(dest), local, "run1/tensorboard", 1)
    local.mkdir()
    (local / "events.1").write_bytes(b"before")
    assert sync.sync() == 1 and (tmp_path / "out" / "run1" / "tensorboard" / "events.1").is_file()
    ops = lease.backend(store)
    assert ops.replace(record("a-thief", time.time(), host="other-pod"), ops.read()[1])  # taken over
    (local / "events.2").write_bytes(b"after")
    assert sync.sync() == 0 and not (tmp_path / "out" / "run1" / "tensorboard" / "events.2").exists()
    assert "other-pod" in held.lost
    held.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(store):
    import os
    import socket
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid that no longer exists
    gone = record("a-killed", time.time(), host=socket.gethostname())  # a fresh heartbeat: not stale by age
    gone.pid, gone.pid_ns = proc.pid, lease_backends.pid_namespace()
    assert lease.backend(store).create(gone)
    held = lease.acquire(store, "run1", "a-new", ttl=30, wait=0)
    assert held.took_over == "a-killed"
    held.release()
    alive = record("a-alive", time.time(), host=socket.gethostname())
    alive.pid, alive.pid_ns = os.getppid(), lease_backends.pid_namespace()
    assert lease.backend(store).create(alive)
    with pytest.raises(LeaseHeldError):  # its pid lives: only the heartbeat's age could free it
        lease.acquire(store, "run1", "a-new", ttl=30, wait=0)


def test_the_folders_the_lease_made_go_with_it(tmp_path):
    (tmp_path / "out").mkdir()
    store = LocalStorage(str(tmp_path / "out" / "run1" / "checkpoints"))
    held = lease.acquire(store, "run1", "a-1", ttl=30, wait=0)
    held.release()  # a run that failed before writing anything leaves no run folder behind
    assert list((tmp_path / "out").iterdir()) == []
    held = lease.acquire(store, "run1", "a-2", ttl=30, wait=0)
    (tmp_path / "out" / "run1" / "README.md").write_text("results")
    held.release()
    assert [p.name for p in (tmp_path / "out" / "run1").iterdir()] == ["README.md"]
