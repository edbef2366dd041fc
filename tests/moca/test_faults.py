"""Fault injection on both trainers (CPU, tiny model, a few steps): kills while a checkpoint is written and
while a finished run's checkpoint is re-saved, truncated / bit-flipped / garbage checkpoint files, a pickle
payload, SIGTERM and SIGINT, two runs on one folder, a full or read-only disk, an export cut short, and
embedded data files cut short. After each fault nothing is lost: the resumed run equals the uninterrupted one
bitwise (losses of every step), or the command ends with one line naming the file and the cause.

The SIGKILL and command-line cases run in child processes, started together at the beginning (they overlap
with the in-process cases); ``MOCA_FAULT`` (moca.train.safety.fault) picks the point where they die."""

import errno
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from moca.config import from_dict
from moca.data.embedded import write_cpt_corpus
from moca.train import safety
from moca.train.core import DistEnv, find_checkpoint, verify_checkpoint
from moca.train.cpt import CptConfig, run_cpt

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TINY = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1, tiny_vision_hidden=16)
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread and the torch kernels for every run here (the module's reference runs included:
    bitwise comparisons), and for the forked children (one thread: safe after fork)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:      # the module-scoped reference runs too (conftest's is per test)
        mp.setenv("MOCA_KERNELS_IMPL", "torch")
        yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _clean_faults(monkeypatch):
    monkeypatch.delenv("MOCA_FAULT", raising=False)
    safety._fault_hits.clear()
    yield
    safety._fault_hits.clear()


def _in_child(fn, fault, err_path):
    """Run ``fn()`` in a forked child (modules already imported: no start-up cost) with MOCA_FAULT=fault and
    stderr going to ``err_path``; returns (exit code, negative = killed by that signal; stderr text)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.environ["MOCA_FAULT"] = fault
            safety._fault_hits.clear()
            fd = os.open(str(err_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            code = fn()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), Path(err_path).read_text()


def _raw(out, corpus, **train):
    t = dict(output_dir=str(out), max_steps=STEPS, lr=2e-3, warmup_ratio=0.25, log_every=1, seed=0, progress=False,
             tensorboard=False, resume="auto", save_every=1, keep_checkpoints=3)
    t.update(train)
    return {"model": dict(TINY), "data": {"train": [str(corpus)], "token_budget": 128, "prefetch": 0}, "train": t}


def _cfg(out, corpus, **train):
    return from_dict(CptConfig, _raw(out, corpus, **train))


def _losses(history):
    return [(h["step"], h["loss"], h["mlm_loss"], h["mae_loss"]) for h in history]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MOCA_KERNELS_IMPL="torch", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    env.pop("MOCA_FAULT", None)
    env.update(extra)
    return env


def _write_yaml(path, raw):
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The corpus and the uninterrupted reference run (step_2..4 and final/)."""
    base = tmp_path_factory.mktemp("faults")
    corpus = write_cpt_corpus(base / "corpus", n_docs=24, seed=0, passage_words=20)
    full = _losses(run_cpt(_cfg(base / "full", corpus), DistEnv()))
    assert [s for s, *_ in full] == [1, 2, 3, 4]
    return {"base": base, "corpus": corpus, "full": full}


def _copy_full(world, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(world["base"] / "full", dst)
    return dst


def _resume(world, out, **train):
    return _losses(run_cpt(_cfg(out, world["corpus"], **train), DistEnv()))


# ------------------------------------------------------------------------------------------------------------
# Kills while a checkpoint is written (child processes)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["save.write@3", "save.manifest@3", "save.prune@1"])
def test_a_kill_while_a_checkpoint_is_written_loses_nothing(world, tmp_path, caplog, point):
    """Killed writing step 3's files, before its manifest, or removing step 1 after step 2 (keep 1)."""
    run = tmp_path / "run"
    keep = 1 if "prune" in point else 3
    rc, err = _in_child(lambda: run_cpt(_cfg(run, world["corpus"], keep_checkpoints=keep), DistEnv()) and 0,
                        f"{point}:kill", tmp_path / "err")
    assert rc == -signal.SIGKILL, (rc, err[-2000:])
    ck = run / "checkpoints"
    left = ".del_step_00000001" if "prune" in point else ".tmp_step_00000003"
    assert (ck / left).is_dir() and not (ck / "step_00000003").exists()
    assert find_checkpoint("auto", run).name == "step_00000002"
    with caplog.at_level("WARNING", logger="moca.train"):
        rest = _resume(world, run, keep_checkpoints=keep)
    assert rest == world["full"][2:], "the resumed run differs from the uninterrupted one"
    assert not list(ck.glob(".*"))
    assert "prune" in point or "unfinished checkpoint" in caplog.text


def test_a_kill_while_a_finished_runs_checkpoint_is_resaved_loses_nothing(world, tmp_path, caplog):
    run = _copy_full(world, tmp_path)        # a finished run; run again from scratch (resume: null) in its folder
    rc, err = _in_child(lambda: run_cpt(_cfg(run, world["corpus"], save_every=0, resume=None), DistEnv()) and 0,
                        "save.swap:kill", tmp_path / "err")
    assert rc == -signal.SIGKILL, (rc, err[-2000:])
    ck = run / "checkpoints"
    # killed between moving the old step_4 aside and renaming the new one in
    assert not (ck / "step_00000004").exists() and (ck / ".old_step_00000004").is_dir()
    with caplog.at_level("WARNING", logger="moca.train"):
        assert _resume(world, run, save_every=0) == []          # restored, at step 4 of 4: nothing to do
    assert "restoring" in caplog.text
    assert verify_checkpoint(ck / "step_00000004") is None and not list(ck.glob(".*"))
    # the restored checkpoint is the uninterrupted run's, byte for byte
    for name in ("model.safetensors", "optimizer.pt", "rank00000.pt"):
        assert (ck / "step_00000004" / name).read_bytes() == \
            (world["base"] / "full" / "checkpoints" / "step_00000004" / name).read_bytes(), name


def test_rerunning_a_finished_run_rewrites_no_checkpoint(world, tmp_path, monkeypatch):
    run = _copy_full(world, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").glob("step_*/*")}
    monkeypatch.setenv("MOCA_FAULT", "save.swap:kill")      # would kill this process if it re-saved
    assert _resume(world, run) == []
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").glob("step_*/*")} == before


def test_the_issue_13_state_complete_without_rank_file_falls_back(world, tmp_path, caplog):
    """What a kill inside the old rmtree left: step_N/COMPLETE without rank00000.pt."""
    run = _copy_full(world, tmp_path)
    (run / "checkpoints" / "step_00000004" / "rank00000.pt").unlink()
    with caplog.at_level("WARNING", logger="moca.train"):
        assert find_checkpoint("auto", run).name == "step_00000003"
        assert _resume(world, run) == world["full"][3:]
    assert "rank00000.pt is missing" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# Damaged checkpoint files
# ------------------------------------------------------------------------------------------------------------


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_bit(p):
    b = bytearray(p.read_bytes())
    b[len(b) - 100] ^= 0x10                  # inside the last tensor's data: the file still parses
    p.write_bytes(bytes(b))


DAMAGE = {
    "truncated rank file": ("rank00000.pt", _truncate, "truncated"),
    "truncated model": ("model.safetensors", _truncate, "truncated"),
    "truncated optimizer": ("optimizer.pt", _truncate, "truncated"),
    "garbage trainer state": ("trainer_state.json", lambda p: p.write_text('{"step": 4, "micro'), "bytes"),
    "flipped bit in the model": ("model.safetensors", _flip_bit, "checksum"),
    "garbage manifest": ("MANIFEST.json", lambda p: p.write_text("{not json"), "unreadable"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(world, tmp_path, caplog, kind):
    name, damage, why = DAMAGE[kind]
    run = _copy_full(world, tmp_path)
    damage(run / "checkpoints" / "step_00000004" / name)
    with caplog.at_level("WARNING", logger="moca.train"):
        rest = _resume(world, run)
    assert rest == world["full"][3:], "resumed from step 3, the run equals the uninterrupted one"
    msg = caplog.text
    assert "step_00000004" in msg and name in msg and why in msg, msg
    assert verify_checkpoint(run / "checkpoints" / "step_00000004") is None   # written again, intact


def test_no_intact_checkpoint_is_an_error_naming_each(world, tmp_path):
    run = _copy_full(world, tmp_path)
    for p in (run / "checkpoints").glob("step_*"):
        _truncate(p / "optimizer.pt")
    with pytest.raises(safety.CheckpointError, match=r"step_00000002: .*optimizer.pt .*truncated.*resume: null"):
        _resume(world, run)


class _Payload:
    """Unpickling this runs Path.touch(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("name", ["optimizer.pt", "rank00000.pt"])
def test_a_pickle_payload_in_a_checkpoint_does_not_run(world, tmp_path, name):
    from moca.fsutil import build_manifest

    run = _copy_full(world, tmp_path)
    ck = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "payload_ran"
    obj = torch.load(ck / name, weights_only=True)
    obj["evil"] = _Payload(marker)
    torch.save(obj, ck / name)
    files = sorted(p.name for p in ck.iterdir() if p.name not in ("MANIFEST.json", "COMPLETE"))
    (ck / "MANIFEST.json").write_text(json.dumps({"files": build_manifest(ck, files)}))   # the attacker fixes it
    assert verify_checkpoint(ck) is None
    with pytest.raises(safety.CheckpointError, match=f"cannot load {name}"):
        _resume(world, run)
    assert not marker.exists(), "the pickle payload ran"


def test_resume_never_unpickles_objects():
    src = "\n".join(p.read_text() for p in (ROOT / "moca").rglob("*.py"))
    assert "weights_only=False" not in src


# ------------------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", ["term", "int"])
def test_a_signal_finishes_the_step_saves_and_the_resumed_run_is_identical(world, tmp_path, monkeypatch, sig):
    run = tmp_path / "run"
    monkeypatch.setenv("MOCA_FAULT", f"step@2:{sig}")
    with pytest.raises(safety.TrainingInterrupted) as info:
        run_cpt(_cfg(run, world["corpus"], save_every=0), DistEnv())
    assert info.value.exit_code == (143 if sig == "term" else 130) and info.value.step == 2
    assert verify_checkpoint(run / "checkpoints" / "step_00000002") is None and not (run / "final").exists()
    monkeypatch.delenv("MOCA_FAULT")
    assert _resume(world, run, save_every=0) == world["full"][2:]
    assert signal.getsignal(signal.SIGINT) is not None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _cli(tmp_path, world):
    from moca.cli import main

    cfg = _write_yaml(tmp_path / "run.yaml", _raw(tmp_path / "run", world["corpus"]))
    return lambda: main(["train", "cpt", "--config", str(cfg)])


def test_sigterm_on_the_command_line_ends_with_one_line_and_143(world, tmp_path):
    rc, err = _in_child(_cli(tmp_path, world), "step@2:term", tmp_path / "err")
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("moca: stopped by SIGTERM after step 2 of 4;") and "run the same command again" in last
    assert _resume(world, tmp_path / "run") == world["full"][2:]


def test_a_second_signal_exits_at_once(world, tmp_path):
    rc, err = _in_child(_cli(tmp_path, world), "step@2:int2", tmp_path / "err")
    assert rc == 130, err[-3000:]
    assert "moca: second SIGINT: exiting at once" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints" / "step_00000002").exists()   # no checkpoint was waited for


# ------------------------------------------------------------------------------------------------------------
# Two runs on one folder
# ------------------------------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_refuses_and_a_dead_runs_lock_is_taken_over(world, tmp_path, caplog):
    run = tmp_path / "run"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                # the first run: holds the lock until killed
        try:
            os.close(r)
            safety.RunLock(run).acquire()
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    try:
        with pytest.raises(safety.RunLockedError, match=f"in use by another run: pid {pid} on host "):
            run_cpt(_cfg(run, world["corpus"], max_steps=1), DistEnv())
        assert not (run / "config.yaml").exists(), "the refused run wrote nothing"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    with caplog.at_level("WARNING", logger="moca.train"):
        hist = run_cpt(_cfg(run, world["corpus"], max_steps=1), DistEnv())
    assert [h["step"] for h in hist] == [1]
    assert f"left by pid {pid}" in caplog.text and "no longer running" in caplog.text
    assert (run / "moca.lock").read_text() == "", "a finished run leaves nothing to take over"


# ------------------------------------------------------------------------------------------------------------
# Disk errors
# ------------------------------------------------------------------------------------------------------------


def test_a_full_disk_while_saving_removes_the_temporary_and_names_path_and_cause(world, tmp_path, monkeypatch,
                                                                               capsys):
    from moca.cli import main
    from moca.train import core

    run = _copy_full(world, tmp_path)
    real = core._save_torch

    def full_disk(obj, path):
        if path.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path)

    monkeypatch.setattr(core, "_save_torch", full_disk)
    cfg = _raw(run, world["corpus"], max_steps=6)
    rc = main(["train", "cpt", "--config", str(_write_yaml(tmp_path / "c.yaml", cfg))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("moca: error: could not write checkpoint ")
    assert "step_00000005" in err[-1] and "No space left on device" in err[-1] and "optimizer.pt" in err[-1]
    ck = run / "checkpoints"
    assert not list(ck.glob(".tmp_*")) and find_checkpoint("auto", run).name == "step_00000004"


def test_a_read_only_or_missing_output_folder_is_one_error_line(world, tmp_path, monkeypatch, capsys):
    from moca.cli import main
    from moca.train import core

    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "run"              # a folder under a regular file
    rc = main(["train", "cpt", "--config", str(_write_yaml(tmp_path / "a.yaml", _raw(bad, world["corpus"])))])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("moca: error: ") and str(tmp_path / "file") in err and "\n" not in err

    def read_only(obj, path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(core, "dump_config", read_only)
    run = tmp_path / "ro"
    rc = main(["train", "cpt", "--config", str(_write_yaml(tmp_path / "b.yaml", _raw(run, world["corpus"])))])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == f"moca: error: [Errno {errno.EROFS}] Read-only file system: '{run / 'config.yaml'}'"


def test_a_full_disk_during_the_export_leaves_a_marked_incomplete_final(world, tmp_path, monkeypatch):
    from moca.data.processor import MocaProcessor
    from moca.modeling import MocaBackbone

    run = tmp_path / "run"
    run_cpt(_cfg(run, world["corpus"], max_steps=2), DistEnv())
    shutil.rmtree(run / "final")
    real = MocaProcessor.save_pretrained

    def full_disk(self, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(path) / "tokenizer.json"))

    monkeypatch.setattr(MocaProcessor, "save_pretrained", full_disk)
    with pytest.raises(safety.ExportError, match=r"final failed: .*No space left on device.*incomplete and marked so"):
        run_cpt(_cfg(run, world["corpus"], max_steps=2), DistEnv())
    final = run / "final"
    assert (final / "config.json").exists() and (final / "INCOMPLETE").exists()   # weights written, tokenizer not
    with pytest.raises(ValueError, match="incomplete export"):
        MocaBackbone.from_pretrained(final)
    monkeypatch.setattr(MocaProcessor, "save_pretrained", real)
    run_cpt(_cfg(run, world["corpus"], max_steps=2), DistEnv())        # run again: exported, loads
    assert not (final / "INCOMPLETE").exists()
    MocaBackbone.from_pretrained(final)


# ------------------------------------------------------------------------------------------------------------
# Embedded data files
# ------------------------------------------------------------------------------------------------------------


def test_embedded_corpus_cut_short_is_written_again(tmp_path, caplog):
    from moca.data.embedded import ensure_cpt_corpus

    path = ensure_cpt_corpus(tmp_path, n_docs=6, seed=1)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])               # half the corpus (a write killed midway)
    with caplog.at_level("WARNING"):
        assert ensure_cpt_corpus(tmp_path, n_docs=6, seed=1).read_bytes() == good
    assert "cpt.jsonl has" in caplog.text and "truncated" in caplog.text
    img = sorted((tmp_path / "images").glob("*.png"))[0]
    img.write_bytes(img.read_bytes()[:40])
    caplog.clear()
    with caplog.at_level("WARNING"):
        ensure_cpt_corpus(tmp_path, n_docs=6, seed=1)
    assert img.name in caplog.text
    mtime = path.stat().st_mtime_ns
    ensure_cpt_corpus(tmp_path, n_docs=6, seed=1)            # intact: reused, not written again
    assert path.stat().st_mtime_ns == mtime


def test_an_embedded_file_write_killed_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    from moca import fsutil

    target = tmp_path / "cpt.jsonl"
    target.write_text("old complete content\n")

    def killed(fd):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(fsutil.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        fsutil.atomic_write_text(target, "new content " * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old complete content\n" and sorted(p.name for p in tmp_path.iterdir()) == ["cpt.jsonl"]


def test_a_full_disk_while_writing_a_data_file_names_it(tmp_path, monkeypatch):
    from moca import fsutil

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # as a write would: no file name

    monkeypatch.setattr(fsutil.os, "fsync", full)
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'subsets.json'}'"):
        fsutil.atomic_write_text(tmp_path / "subsets.json", "{}")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_embedded_subsets_index_cut_short_is_written_again(tmp_path, caplog):
    from moca.train.contrastive import embedded_subsets

    first = embedded_subsets(tmp_path, 3, 1, seed=0)
    index = tmp_path / "subsets.json"
    index.write_text(index.read_text()[:50])               # a JSON error on every later run, before
    with caplog.at_level("WARNING"):
        again = embedded_subsets(tmp_path, 3, 1, seed=0)
    assert [s.files for s in again] == [s.files for s in first] and "subsets.json is unreadable" in caplog.text
    jsonl = Path(first[0].files[0])
    jsonl.write_text(jsonl.read_text().splitlines()[0] + "\n")   # one record left
    caplog.clear()
    with caplog.at_level("WARNING"):
        embedded_subsets(tmp_path, 3, 1, seed=0)
    assert jsonl.name in caplog.text and len(jsonl.read_text().splitlines()) == 3


def test_embedded_eval_tasks_cut_short_are_written_again(tmp_path, monkeypatch, caplog):
    import functools

    from moca.data import embedded_retrieval
    from moca.eval import embedded_tasks

    monkeypatch.setattr(embedded_retrieval, "write_eval_tasks", functools.partial(
        embedded_retrieval.write_eval_tasks, n_queries=4, n_candidates=3, corpus_size=8, image_size=56))
    first = embedded_tasks(tmp_path, seed=0)
    corpus = tmp_path / "scene_search_corpus.jsonl"
    corpus.write_text(corpus.read_text()[:30])                # a kill mid-write, before atomic writes
    with caplog.at_level("WARNING"):
        again = embedded_tasks(tmp_path, seed=0)
    assert "scene_search_corpus.jsonl has" in caplog.text and len(corpus.read_text().splitlines()) == 8
    assert [t.name for t in again] == [t.name for t in first]


# ------------------------------------------------------------------------------------------------------------
# Stage 2
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cl_world(tmp_path_factory):
    from moca.data.embedded_retrieval import write_train_subsets
    from moca.train.contrastive import run_cl

    base = tmp_path_factory.mktemp("cl")
    subsets = write_train_subsets(base / "pairs", n_per_subset=8, hard_negatives=1, seed=0, image_size=56)

    def cfg(out, **train):
        from moca.train.contrastive import ClConfig

        t = {"output_dir": str(out), "max_steps": 3, "lr": 1e-3, "log_every": 1, "progress": False,
             "tensorboard": False, "resume": "auto", "warmup_ratio": 0.25, "save_every": 1, "keep_checkpoints": 3}
        t.update(train)
        return from_dict(ClConfig, {"model": dict(TINY, tiny_vision_depth=2, tiny_image_size=56),
                                    "data": {"subsets": subsets, "global_batch_size": 4, "hard_negatives": 1},
                                    "loss": {"learnable_temperature": True}, "train": t})

    def run(out, **train):
        return [(h["step"], h["loss"], h["temperature"]) for h in run_cl(cfg(out, **train), DistEnv())]

    full = run(base / "full")
    return {"base": base, "run": run, "full": full}


def test_stage2_sigterm_then_resume_equals_the_uninterrupted_run(cl_world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("MOCA_FAULT", "step@1:term")
    with pytest.raises(safety.TrainingInterrupted, match="stopped by SIGTERM after step 1 of 3"):
        cl_world["run"](run, save_every=0)
    monkeypatch.delenv("MOCA_FAULT")
    assert cl_world["run"](run) == cl_world["full"][1:]


def test_stage2_bit_flipped_checkpoint_falls_back(cl_world, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(cl_world["base"] / "full", run)
    _flip_bit(run / "checkpoints" / "step_00000003" / "model.safetensors")
    with caplog.at_level("WARNING", logger="moca.train"):
        assert cl_world["run"](run) == cl_world["full"][2:]
    assert "step_00000003" in caplog.text and "checksum" in caplog.text
