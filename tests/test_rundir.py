"""rundir.py: the run directory's shared files, one schema each, and what happens when writing them fails."""
import dataclasses
import errno
import json
import os

import pytest
import torch

import rundir
from data.shards import WriteError, atomic_write
from test_spectra import random_model


def dead_pid():
    """A process id that no process has now."""
    pid = 2 ** 22 - 1
    while rundir.process_alive(pid):
        pid -= 1
    return pid


def test_a_checkpoint_round_trips_and_a_broken_one_is_named(tmp_path):
    model = random_model()
    ckpt = rundir.Checkpoint(model=model.state_dict(), model_config=dataclasses.asdict(model.cfg),
                             config={"seq_len": 16}, step=7, tokens=7 * 64,
                             rng=[{"cpu": torch.get_rng_state(), "cuda": None}])
    path = ckpt.save(str(tmp_path), keep=2)
    assert path.endswith("ckpt/step_00000007.pt") and rundir.checkpoints(str(tmp_path)) == [path]
    back = rundir.Checkpoint.load(path)
    assert back.step == 7 and back.config == {"seq_len": 16} and back.interval is None
    assert all(torch.equal(back.model[k], v) for k, v in model.state_dict().items())
    assert torch.load(path, weights_only=True)["step"] == 7  # a plain dict: loads without our code
    loaded = rundir.load_model(path)  # the model from a checkpoint, in eval mode
    assert not loaded.training and all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))
    for keep_step in (8, 9):  # only the newest `keep` stay
        rundir.Checkpoint(model={}, model_config={}, step=keep_step).save(str(tmp_path), keep=2)
    assert [os.path.basename(p) for p in rundir.checkpoints(str(tmp_path))] == ["step_00000008.pt", "step_00000009.pt"]
    data = open(rundir.checkpoints(str(tmp_path))[0], "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(rundir.RunFileError, match=r"cut.pt is not a trainer checkpoint: it is truncated") as e:
        rundir.Checkpoint.load(str(cut))
    assert "weights_only" not in str(e.value)  # torch's advice to load it unsafely is not passed on


def test_the_newest_checkpoint_that_loads_is_chosen_and_the_others_named(tmp_path):
    for step in (2, 4, 6):
        rundir.Checkpoint(model={"w": torch.ones(3)}, model_config={}, step=step).save(str(tmp_path), keep=3)
    newest = rundir.checkpoints(str(tmp_path))[-1]
    with open(newest, "r+b") as f:
        f.truncate(100)
    said = []
    path, ckpt = rundir.newest_checkpoint(str(tmp_path), warn=said.append)
    assert ckpt.step == 4 and path.endswith("step_00000004.pt")
    assert len(said) == 1 and "step_00000006.pt is not a trainer checkpoint: it is truncated" in said[0]
    for p in rundir.checkpoints(str(tmp_path)):
        open(p, "wb").close()
    with pytest.raises(rundir.RunFileError, match=r"no checkpoint of .* loads:\n.*step_00000006.pt.*\n.*step_00000004"):
        rundir.newest_checkpoint(str(tmp_path), warn=said.append)


def test_a_failed_write_leaves_no_temporary_file_and_names_the_full_disk(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    path.parent.mkdir()

    def fill_the_disk(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(WriteError, match=rf"no space left on {tmp_path / 'sub'} while writing file.bin"):
        atomic_write(str(path), fill_the_disk)
    assert os.listdir(path.parent) == []  # neither the file nor its temporary
    with pytest.raises(KeyboardInterrupt):  # interrupted (but not killed): cleaned up too
        atomic_write(str(path), lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert os.listdir(path.parent) == []


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    (tmp_path / "ckpt").mkdir()
    dead = tmp_path / "ckpt" / f"step_00000004.pt.tmp{dead_pid()}"
    live = tmp_path / "ckpt" / f"step_00000006.pt.tmp{os.getpid()}"
    other = tmp_path / "notes.tmp.txt"
    for f in (dead, live, other):
        f.write_bytes(b"partial")
    assert rundir.remove_stale_temporaries(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists()


def test_the_run_record_round_trips_and_names_a_bad_file(tmp_path):
    record = rundir.RunRecord(config={"batch_size": 4}, model={"n_layer": 2}, labels=["g", "bs4", ["a"]],
                              spectra={"point_names": ["embed"]}, metric_version=3)
    record.save(str(tmp_path))
    assert rundir.RunRecord.load(str(tmp_path)) == record
    old = {"config": {"batch_size": 4}, "model": {}, "git": {}, "a_key_of_another_version": 1}
    (tmp_path / "config.json").write_text(json.dumps(old))
    back = rundir.RunRecord.load(str(tmp_path))
    assert back.metric_version == 1 and back.labels is None and back.spectra == {}  # absent: what old runs had
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(rundir.RunFileError, match=r"config.json: expected a JSON object .* found a list"):
        rundir.RunRecord.load(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(rundir.RunFileError, match=r"config.json: not valid JSON"):
        rundir.RunRecord.load(str(tmp_path))
