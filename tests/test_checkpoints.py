"""Checkpoint mirroring and the choice of the checkpoint to resume from, on a local store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from job.checkpoints import LATEST, MARKER, CheckpointStore
from job.identity import Fingerprint
from job.storage import LocalStorage


def fake_checkpoint(root: Path, step: int) -> Path:
    local = root / "local" / f"checkpoint-{step}"
    local.mkdir(parents=True)
    (local / "adapter_model.safetensors").write_bytes(bytes([step % 256]) * 1000)
    (local / "optimizer.pt").write_bytes(b"opt" * step)
    (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return local


def store(tmp_path: Path, keep: int = 2) -> CheckpointStore:
    return CheckpointStore(LocalStorage(str(tmp_path / "remote")), keep)


def test_mirror_writes_files_then_marker_then_latest_and_prunes(tmp_path):
    ckpts = store(tmp_path, keep=2)
    for step in (10, 20, 30):
        ckpts.mirror(fake_checkpoint(tmp_path, step), step)
    remote = tmp_path / "remote"
    assert json.loads((remote / LATEST).read_text()) == {"checkpoint": "checkpoint-30", "step": 30}
    assert sorted(p.name for p in remote.iterdir() if p.is_dir()) == ["checkpoint-20", "checkpoint-30"]
    marker = json.loads((remote / "checkpoint-30" / MARKER).read_text())
    assert set(marker["files"]) == {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"}


def test_restore_takes_the_latest_complete_checkpoint(tmp_path):
    ckpts = store(tmp_path)
    for step in (10, 20):
        ckpts.mirror(fake_checkpoint(tmp_path, step), step)
    local, step = ckpts.restore(tmp_path / "resume")
    assert step == 20
    assert (local / "optimizer.pt").read_bytes() == b"opt" * 20


def test_restore_skips_a_corrupt_checkpoint_for_the_previous_one(tmp_path):
    ckpts = store(tmp_path)
    for step in (10, 20):
        ckpts.mirror(fake_checkpoint(tmp_path, step), step)
    (tmp_path / "remote" / "checkpoint-20" / "optimizer.pt").write_bytes(b"garbage")
    assert ckpts.restore(tmp_path / "resume")[1] == 10
    assert not (tmp_path / "resume" / "checkpoint-20").exists()


def test_restore_skips_a_checkpoint_whose_upload_did_not_finish(tmp_path):
    ckpts = store(tmp_path, keep=3)
    ckpts.mirror(fake_checkpoint(tmp_path, 10), 10)
    # An upload killed half-way: some files, no marker, `latest` not yet moved.
    partial = tmp_path / "remote" / "checkpoint-20"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    assert ckpts.restore(tmp_path / "resume")[1] == 10


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert store(tmp_path).restore(tmp_path / "resume") is None


def test_clear_leaves_nothing_and_no_dangling_latest(tmp_path):
    ckpts = store(tmp_path)
    ckpts.mirror(fake_checkpoint(tmp_path, 10), 10)
    ckpts.clear()
    assert not (tmp_path / "remote").exists()


def test_a_checkpoint_saved_with_other_training_settings_is_refused(tmp_path):
    import pytest

    from job.errors import ConfigError

    a = Fingerprint("settings-a")
    CheckpointStore(LocalStorage(str(tmp_path / "remote")), 2, a).mirror(fake_checkpoint(tmp_path, 10), 10)
    assert CheckpointStore(LocalStorage(str(tmp_path / "remote")), 2, a).restore(tmp_path / "r1")[1] == 10
    with pytest.raises(ConfigError, match="saved by this run id with other training settings"):
        CheckpointStore(LocalStorage(str(tmp_path / "remote")), 2, Fingerprint("settings-b")).restore(tmp_path / "r2")


def settings_store(tmp_path: Path, **settings) -> CheckpointStore:
    from job.config import Settings
    from job.identity import training_fingerprint

    cfg = Settings(**{"device": "cpu", "base_model": "m", "dataset": "d.jsonl", **settings})
    return CheckpointStore(LocalStorage(str(tmp_path / "remote")), 2, training_fingerprint(cfg))


def test_a_resume_with_another_logging_eval_interval_or_destination_is_the_same_training(tmp_path):
    settings_store(tmp_path, logging_steps=25, eval_steps=25).mirror(fake_checkpoint(tmp_path, 10), 10)
    resumed = settings_store(tmp_path, logging_steps=1, eval_steps=5, output_uri="s3://elsewhere/runs")
    assert resumed.restore(tmp_path / "r")[1] == 10


def test_a_checkpoint_with_other_training_settings_is_refused_naming_them(tmp_path):
    from job.errors import ConfigError

    settings_store(tmp_path, lora_r=16).mirror(fake_checkpoint(tmp_path, 10), 10)
    with pytest.raises(ConfigError) as e:
        settings_store(tmp_path, lora_r=64, logging_steps=1).restore(tmp_path / "r")
    assert "was saved by this run id with other training settings (FT_LORA_R: 16 saved, 64 now); " in str(e.value)
    assert "LOGGING" not in str(e.value)


def test_a_checkpoint_that_records_only_the_hash_is_compared_by_it(tmp_path):
    from job.errors import ConfigError

    settings_store(tmp_path, lora_r=16).mirror(fake_checkpoint(tmp_path, 10), 10)
    marker_path = tmp_path / "remote" / "checkpoint-10" / MARKER
    marker = json.loads(marker_path.read_text())
    del marker["training_settings"]  # as an older version wrote it
    marker_path.write_text(json.dumps(marker))
    assert settings_store(tmp_path, lora_r=16).restore(tmp_path / "r1")[1] == 10
    with pytest.raises(ConfigError, match=r"other training settings \(not named: it was saved by an older version"):
        settings_store(tmp_path, lora_r=64).restore(tmp_path / "r2")
    # the previous rule's hash (logging interval included) still resumes the same settings
    from job.config import Settings
    from job.identity import NOT_FINGERPRINTED, LEGACY_FINGERPRINTED, settings_fingerprint

    old = Settings(device="cpu", base_model="m", dataset="d.jsonl", lora_r=16)
    marker_path.write_text(json.dumps({**marker, "settings": settings_fingerprint(
        old, NOT_FINGERPRINTED - LEGACY_FINGERPRINTED)}))
    assert settings_store(tmp_path, lora_r=16).restore(tmp_path / "r3")[1] == 10


def test_a_difference_hidden_by_redaction_or_a_setting_added_since_is_judged_by_the_hash():
    from job.config import Settings
    from job.identity import training_fingerprint

    def fp(**kw):
        return training_fingerprint(Settings(device="cpu", base_model="m", dataset="d.jsonl", **kw))

    saved, now = fp(model_revision="hf_" + "a" * 30), fp(model_revision="hf_" + "b" * 30)  # both shown as ***
    assert saved.settings == now.settings and saved.digest != now.digest
    assert "a value shown redacted differs" in now.mismatch(saved.digest, saved.settings)
    assert now.mismatch(now.digest, saved.settings) is None
    older = {k: v for k, v in fp().settings.items() if k != "lora_r"}  # a record from before lora_r existed
    assert fp().mismatch("another rule's hash", older) is None  # lora_r at its default: the same training
    assert fp(lora_r=16).mismatch("another rule's hash", older) == " (FT_LORA_R: not recorded, 16 now)"


def test_the_default_run_id_is_the_one_the_same_settings_had(monkeypatch):
    """The run id without FT_RUN_ID or a batch job id hashes the settings as before the logging and eval intervals and
    the destination left the fingerprint: a retry or rerun after an upgrade finds its checkpoints and completed run,
    and two destinations keep two ids."""
    from job.config import Settings
    from job.identity import LEGACY_FINGERPRINTED, NOT_FINGERPRINTED, PLATFORM_JOB_IDS, resolve_run_id, \
        settings_fingerprint

    for var in PLATFORM_JOB_IDS:
        monkeypatch.delenv(var, raising=False)
    cfg = Settings(device="cpu", base_model="m", dataset="d.jsonl", output_uri="s3://a/runs")
    assert resolve_run_id(cfg) == "run-" + settings_fingerprint(cfg, NOT_FINGERPRINTED - LEGACY_FINGERPRINTED)[:12]
    assert resolve_run_id(cfg) != resolve_run_id(cfg.model_copy(update={"output_uri": "s3://b/runs"}))


def test_the_recorded_settings_hold_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    settings_store(tmp_path, model_revision="hf_" + "x" * 30).mirror(
        fake_checkpoint(tmp_path, 10), 10)
    text = (tmp_path / "remote" / "checkpoint-10" / MARKER).read_text()
    assert "x" * 30 not in text
    assert json.loads(text)["training_settings"]["model_revision"] == "***"


def test_a_completed_run_is_compared_on_its_manifest_config(tmp_path):
    from job import completion
    from job.config import Settings
    from job.errors import ConfigError
    from job.identity import training_fingerprint
    from job.publish import MANIFEST

    def cfg(**kw):
        return Settings(device="cpu", base_model="m", dataset="d.jsonl", **kw)

    (tmp_path / "out" / "demo").mkdir(parents=True)
    saved = cfg(lora_r=16, logging_steps=25)
    (tmp_path / "out" / "demo" / MANIFEST).write_text(json.dumps({
        "config": saved.model_dump(mode="json"), "files": {},
        "fingerprint": {"settings": "an older rule's hash", "data": "sha256:d"}}))
    dest = LocalStorage(str(tmp_path / "out"))
    assert completion.find(dest, "demo", training_fingerprint(cfg(lora_r=16, logging_steps=1)), False).intact
    with pytest.raises(ConfigError, match=r"other training settings \(FT_LORA_R: 16 saved, 64 now\) already exists"):
        completion.find(dest, "demo", training_fingerprint(cfg(lora_r=64)), False)


def data_store(tmp_path: Path, data: str, on_data_change: str = "fail") -> CheckpointStore:
    return CheckpointStore(LocalStorage(str(tmp_path / "remote")), 2, Fingerprint("settings"), data, on_data_change)


def test_checkpoints_carry_the_data_fingerprint_and_resume_on_the_same_data(tmp_path):
    data_store(tmp_path, "sha256:aaa").mirror(fake_checkpoint(tmp_path, 10), 10)
    assert json.loads((tmp_path / "remote" / "checkpoint-10" / MARKER).read_text())["data"] == "sha256:aaa"
    assert data_store(tmp_path, "sha256:aaa").restore(tmp_path / "resume")[1] == 10


def test_resuming_on_changed_data_is_refused_and_the_checkpoints_are_kept(tmp_path):
    import pytest

    from job.errors import ConfigError

    data_store(tmp_path, "sha256:aaa").mirror(fake_checkpoint(tmp_path, 10), 10)
    changed = data_store(tmp_path, "sha256:bbb")
    with pytest.raises(ConfigError) as refused:
        changed.check_data()
    message = str(refused.value)
    assert message.startswith("FT_DATASET: ") and "trained on other data (sha256:aaa; now sha256:bbb)" in message
    assert "FT_ON_DATA_CHANGE=restart" in message and refused.value.exit_code == 2
    with pytest.raises(ConfigError):
        changed.restore(tmp_path / "resume")
    assert (tmp_path / "remote" / "checkpoint-10" / MARKER).is_file()


def test_changed_data_with_restart_deletes_the_checkpoints_and_starts_over(tmp_path):
    old = data_store(tmp_path, "sha256:aaa")
    for step in (10, 20):
        old.mirror(fake_checkpoint(tmp_path, step), step)
    new = data_store(tmp_path, "sha256:bbb", "restart")
    assert new.restore(tmp_path / "resume") is None
    assert not (tmp_path / "remote").exists()
    # The new training's checkpoints are not pruned in favour of the old, higher-numbered ones: those are gone.
    new.mirror(fake_checkpoint(tmp_path / "new", 5), 5)
    assert data_store(tmp_path, "sha256:bbb").restore(tmp_path / "resume2")[1] == 5


def test_a_checkpoint_without_a_data_fingerprint_still_resumes(tmp_path):
    store(tmp_path).mirror(fake_checkpoint(tmp_path, 10), 10)  # an older version's marker: no "data"
    assert data_store(tmp_path, "sha256:bbb").restore(tmp_path / "resume")[1] == 10


def lost_after_first_check():
    """A lease guard whose first check passes and every later one finds the lease taken over."""
    from job.errors import LeaseHeldError

    checks = iter([None])

    def guard():
        if next(checks, "lost"):
            raise LeaseHeldError("FT_RUN_ID=r: the lease was taken over")

    return guard


@pytest.mark.parametrize("complete", [True, False])
def test_a_checkpoint_written_after_the_run_was_taken_over_is_removed_once_the_run_is_published(tmp_path, complete):
    # An attempt frozen between its lease check and its writes (issue 20's "frozen holder") wakes up after another
    # attempt took the run over: the check after the writes catches it. When the new owner has already published and
    # removed the checkpoints, what is there is only the stale attempt's, and it goes; else nothing is touched.
    from job.errors import LeaseHeldError

    ckpts = store(tmp_path)
    ckpts.guard, ckpts.run_complete = lost_after_first_check(), lambda: complete
    with pytest.raises(LeaseHeldError):
        ckpts.mirror(fake_checkpoint(tmp_path, 4), 4)
    left = sorted(p.relative_to(tmp_path / "remote").as_posix() for p in (tmp_path / "remote").rglob("*") if p.is_file())
    assert left == [] if complete else {LATEST, "checkpoint-4/checkpoint.json"} <= set(left)


def test_a_write_that_fails_because_the_new_owner_cleaned_up_is_a_lost_lease(tmp_path, monkeypatch):
    """The frozen attempt wakes up mid-write after the attempt that took the run over published and removed the
    checkpoints (the directory being written is gone): LeaseHeldError (exit `busy`), its leftovers removed, not an
    unexpected FileNotFoundError (exit 1). A write that fails while the lease is still held fails as it is."""
    from job.errors import LeaseHeldError

    ckpts = store(tmp_path)
    real_put = ckpts.store.put

    def put_after_clean_up(path, key):
        real_put(path, key)
        shutil.rmtree(tmp_path / "remote", ignore_errors=True)  # the new owner's clean-up, mid-write
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "remote" / key))  # as the copy found

    monkeypatch.setattr(ckpts.store, "put", put_after_clean_up)
    ckpts.guard, ckpts.run_complete = lost_after_first_check(), lambda: True
    with pytest.raises(LeaseHeldError):
        ckpts.mirror(fake_checkpoint(tmp_path, 4), 4)
    assert not [p for p in (tmp_path / "remote").rglob("*") if p.is_file()]
    ckpts.guard = lambda: None  # still the owner: the write's own error
    with pytest.raises(FileNotFoundError):
        ckpts.mirror(fake_checkpoint(tmp_path / "again", 5), 5)
