"""Pretraining under failure: non-finite losses, SIGKILL/SIGTERM and resume, two processes, other device counts."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from pretrain_runs import final_state, model_meta, pretrain_command, steps_logged, tiny_config

from jaxtl.train import NonFiniteLossError, Trainer, pretrain


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(ukb_cache, tmp_path, capsys):
    import orbax.checkpoint as ocp

    # A sane first epoch (6 steps), then the step decay makes the learning rate infinite (1e-3 * 1e300 in float32).
    cfg = tiny_config("optim.lr=1e-3", "optim.step_epochs=1", "optim.gamma=1e300", "checkpoint_every_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"at step \d+.*the last good checkpoint \(step \d+\) is intact") as e:
        pretrain(cfg, ukb_cache, tmp_path / "run2", progress=False)
    bad, good = map(int, re.findall(r"step (\d+)", str(e.value)))
    assert good == bad - 1 == 6  # the first epoch was fine; the first step at the infinite rate was not
    with ocp.CheckpointManager(tmp_path / "run2" / "checkpoints") as mngr:
        assert mngr.latest_step() == good
        state = mngr.restore(good, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    # the way on that the message gives: resume with a lower learning rate (the schedule may change on resume)
    with pytest.raises(NonFiniteLossError, match=f"at step {bad}"):  # the same command repeats the same steps
        pretrain(cfg, ukb_cache, tmp_path / "run2", progress=False)
    assert "resume with a lower learning rate (--set optim.lr=" in str(e.value)
    calmer = tiny_config("optim.lr=1e-3", "optim.step_epochs=1", "optim.gamma=0.5", "checkpoint_every_steps=1")
    pretrain(calmer, ukb_cache, tmp_path / "run2", progress=False)
    assert f"resuming at step 6 (epoch 1) from {tmp_path / 'run2' / 'checkpoints'} with optim.gamma 0.5 (was 1e+300)" \
        in capsys.readouterr().err
    steps = [r["step"] for r in steps_logged(tmp_path / "run2")]
    assert steps == list(range(1, 13))  # 2 epochs of 6 steps, each logged once
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["optim"]["gamma"] == 0.5


@pytest.fixture(scope="module")
def clean(ukb_cache, tmp_path_factory):
    """An uninterrupted tiny run (2 epochs of 6 steps), the reference of the interrupted ones. Tests only read it."""
    workdir = tmp_path_factory.mktemp("clean")
    pretrain(tiny_config(), ukb_cache, workdir, progress=False)
    return workdir


def test_kill_then_sigterm_then_resume_is_bitwise_identical(ukb_cache, clean, tmp_path):
    """SIGKILL at a random step (checkpoints every step), then SIGTERM to the resumed run as soon as it trains (a
    checkpoint at the current step, a progress line, exit status 143), then the same command once more: exactly
    the parameters of an uninterrupted run, each step logged once. (One run of each: every `jaxtl pretrain`
    started costs the suite ~10 s.)"""
    import orbax.checkpoint as ocp

    from jaxtl.train import PREEMPTED_EXIT_CODE

    total = len(steps_logged(clean))
    rng = np.random.default_rng(0)
    work = tmp_path / "work"
    cmd, env = pretrain_command(ukb_cache, work, "checkpoint_every_steps=1")
    kill_after = int(rng.integers(2, 5))  # in the first epoch: the resumed run then has most of the run left
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len({r["step"] for r in steps_logged(work)}) < kill_after and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(float(rng.uniform(0, 0.3)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in steps_logged(work))
    assert killed_at < total

    cmd, env = pretrain_command(ukb_cache, work)  # checkpoints at epoch ends only: SIGTERM's is its own
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while max([0] + [r["step"] for r in steps_logged(work)]) <= killed_at and proc.poll() is None:  # training
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == PREEMPTED_EXIT_CODE == 143, err[-3000:]
    stopped = int(re.search(rf"pretraining in {re.escape(str(work))}: preempted at step (\d+): checkpoint saved, rerun "
                            r"the same command to resume", err)[1])
    assert killed_at < stopped < total  # before the end unless the machine stalled for several steps
    with ocp.CheckpointManager(work / "checkpoints") as mngr:
        assert mngr.latest_step() == stopped
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": stopped, "epoch": stopped / 6, "preempted": True}

    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    jax.tree.map(np.testing.assert_array_equal, final_state(clean), final_state(work))
    assert [r["step"] for r in steps_logged(work)] == list(range(1, total + 1))  # each step logged once
    # the command prints the run's results, not only where the model is
    assert re.search(rf"{total} steps \(2 epochs\); test MAE [\d.]+ \(model/\), [\d.]+ \(best/, epoch \d\); "
                     r"mean predictor [\d.]+\nfinal model: ", done.stdout), done.stdout


def test_ctrl_c_checkpoints_the_current_step_and_exits_130(ukb_cache, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from jaxtl.train import Preempted

    step = Trainer.step

    def ctrl_c_in_step_3(self, images, labels, i):
        if i == 2:
            signal.raise_signal(signal.SIGINT)
        return step(self, images, labels, i)

    monkeypatch.setattr(Trainer, "step", ctrl_c_in_step_3)
    with pytest.raises(Preempted) as e:
        pretrain(tiny_config(), ukb_cache, tmp_path, progress=False)
    assert e.value.step == 3 and e.value.code == 130
    with ocp.CheckpointManager(tmp_path / "checkpoints") as mngr:
        assert mngr.latest_step() == 3


@pytest.mark.parametrize("epoch", [1, 2])
def test_sigterm_during_validation_checkpoints_and_validates_on_resume(epoch, ukb_cache, clean, tmp_path,
                                                                        monkeypatch):
    """A notice during the end-of-epoch validation abandons the pass (it can outlast a grace period): the epoch's
    checkpoint is written at once, and the resumed run validates that epoch before training on; after the last
    epoch (nothing left to train, no later checkpoint), a further rerun does not validate it again."""
    import orbax.checkpoint as ocp

    from jaxtl import train
    from jaxtl.train import Preempted

    original, calls = train.eval_dataset, []

    def noticed_in_first_batch(*args, **kwargs):
        calls.append(1)
        for i, batch in enumerate(original(*args, **kwargs)):
            if i == 0 and len(calls) == epoch:
                signal.raise_signal(signal.SIGTERM)
            yield batch

    work = tmp_path / "work"
    monkeypatch.setattr(train, "eval_dataset", noticed_in_first_batch)
    with pytest.raises(Preempted) as e:
        pretrain(tiny_config(), ukb_cache, work, progress=False)
    assert e.value.step == 6 * epoch and e.value.code == 143
    assert (work / "best").exists() == (epoch > 1)
    with ocp.CheckpointManager(work / "checkpoints") as mngr:
        assert mngr.latest_step() == 6 * epoch
        meta = mngr.restore(6 * epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    assert meta["unvalidated_epoch"] == epoch and (meta["best"] is None) == (epoch == 1)
    monkeypatch.setattr(train, "eval_dataset", original)
    if epoch == 1:  # the resumed run validates epoch 1, then dies before its next checkpoint (step 12)
        step = Trainer.step

        def crash_at_7(self, images, labels, i):
            if i == 6:
                raise RuntimeError("killed")
            return step(self, images, labels, i)

        monkeypatch.setattr(Trainer, "step", crash_at_7)
        with pytest.raises(RuntimeError, match="killed"):
            pretrain(tiny_config(), ukb_cache, work, progress=False)
        monkeypatch.setattr(Trainer, "step", step)  # rerun: epoch 1's logged result is the best to beat
    pretrain(tiny_config(), ukb_cache, work, progress=False)

    def val_records(workdir):
        return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "val_mae" in r]

    assert val_records(work) == val_records(clean) and len(val_records(clean)) == 2
    assert model_meta(work / "best") == model_meta(clean / "best")
    jax.tree.map(np.testing.assert_array_equal, final_state(clean), final_state(work))
    pretrain(tiny_config(), ukb_cache, work, progress=False)  # finished: a rerun validates nothing again
    assert val_records(work) == val_records(clean)


def test_preemption_watch_restores_the_sigterm_handler_and_skips_other_threads():
    import threading

    from jaxtl.train import _PreemptionWatch

    calls = []
    original, original_int = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum)), \
        signal.getsignal(signal.SIGINT)
    try:
        previous = signal.getsignal(signal.SIGTERM)
        with _PreemptionWatch(mngr=None) as watch:
            assert signal.getsignal(signal.SIGTERM) == watch._on_signal and not watch.reached(3)
            signal.raise_signal(signal.SIGTERM)  # the notice: recorded, the previous handler not called
            assert watch.reached(3) and calls == []
            signal.raise_signal(signal.SIGTERM)  # asked twice: what SIGTERM did before
            assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is previous
        # Ctrl-C: the same notice, exit status 130; twice: what SIGINT did before (by default KeyboardInterrupt: stop
        # at once). A recording handler stands in for the default here, as for SIGTERM above: a CI run once saw no
        # KeyboardInterrupt from the nested signal in an xdist worker (not reproduced in 3 full runs)
        signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
        previous_int = signal.getsignal(signal.SIGINT)
        with _PreemptionWatch(mngr=None) as watch:
            signal.raise_signal(signal.SIGINT)
            assert watch.reached(1) and watch.exit_code == 130 and calls == [signal.SIGTERM]
            signal.raise_signal(signal.SIGINT)
            assert calls == [signal.SIGTERM, signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is previous_int
        with _PreemptionWatch(mngr=None):
            pass
        assert signal.getsignal(signal.SIGTERM) is previous
        seen = []

        def off_main_thread():
            with _PreemptionWatch(mngr=None) as w:
                seen.append((signal.getsignal(signal.SIGTERM), w.reached(1)))

        thread = threading.Thread(target=off_main_thread)
        thread.start()
        thread.join()
        assert seen == [(previous, False)]
    finally:
        signal.signal(signal.SIGTERM, original)
        signal.signal(signal.SIGINT, original_int)


def test_ctrl_c_is_caught_by_one_process_under_jax_distributed(monkeypatch):
    """`--distributed` / `--coordinator` with a single process: JAX's preemption service takes SIGTERM, and
    Ctrl-C still checkpoints (it had raised KeyboardInterrupt at once, without a checkpoint)."""
    from types import SimpleNamespace

    from jaxtl.train import _PreemptionWatch

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)  # the service is on by default
    service = []  # the steps JAX's service has agreed to stop at
    mngr = SimpleNamespace(reached_preemption=lambda step: step in service)
    calls = []
    original_term = signal.getsignal(signal.SIGTERM)
    original_int = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with _PreemptionWatch(mngr) as watch:
            assert watch.jax_service and signal.getsignal(signal.SIGTERM) is original_term  # JAX's to handle
            assert not watch.reached(1)
            service.append(2)
            assert watch.reached(2) and watch.exit_code == 143
            signal.raise_signal(signal.SIGINT)
            assert watch.reached(3) and watch.interrupted() and watch.exit_code == 130 and calls == []
    finally:
        signal.signal(signal.SIGINT, original_int)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(ukb_cache, workdir, extra, sigterm_after: int | None = None) -> list[tuple[int, str]]:
    """Both processes' (exit status, output); `sigterm_after`: SIGTERM to process 1 alone once that many steps
    are logged."""
    port = _free_port()
    procs = []
    for pid in (0, 1):
        cmd, env = pretrain_command(ukb_cache, workdir, *extra, devices=2)
        cmd += ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    if sigterm_after is not None:
        deadline = time.time() + 240
        while len(steps_logged(workdir)) < sigterm_after and all(p.poll() is None for p in procs):
            assert time.time() < deadline
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]


def _run_two_processes_retrying(ukb_cache, workdir, extra, expected_rc: int, **kw) -> list[str]:
    for attempt in (1, 2):
        outs = _run_two_processes(ukb_cache, workdir, extra, **kw)
        # Gloo gives all processes a fixed 30 s to join its first collective; on a loaded 2-core CI machine
        # one process can fall that far behind. That (and only that) is retried once: it fails before any step.
        if attempt == 1 and any(rc != 0 and "Gloo context initialization failed" in out for rc, out in outs):
            continue
        for rc, out in outs:
            assert rc == expected_rc, out[-3000:]
        return [out for _, out in outs]


def test_two_processes_match_one_process(ukb_cache, tmp_path):
    """2 processes x 2 virtual devices (gloo collectives over localhost) == 1 process x 1 device (this one), in
    training and in validation (6 scans: the last global batch is half padding, all of it in process 1's block),
    through a preemption: SIGTERM to one process stops both at the same step (JAX's preemption service), a rerun
    resumes. The checkpoints of the 4 devices resume on 1 (training on from the preemption; the final state
    exactly). The single-process runs are in this process (each `jaxtl pretrain` started took ~5 s more)."""
    # a small step keeps float-order differences from being amplified
    extra = ["epochs=1", "optim.lr=0.001", "data.val_fraction=0.1875"]
    pretrain(tiny_config(*extra), ukb_cache, tmp_path / "single", progress=False)
    multi_dir = tmp_path / "multi"
    outs = _run_two_processes_retrying(ukb_cache, multi_dir, extra, expected_rc=143, sigterm_after=1)
    stopped = {int(re.search(r"process \d/2: preempted at step (\d+): checkpoint saved", out)[1]) for out in outs}
    assert len(stopped) == 1, outs  # the same step on both processes
    # the checkpoint of 2 processes resumes on 1 (a pod or cluster back with fewer hosts): same data stream
    shutil.copytree(multi_dir, tmp_path / "fewer")
    pretrain(tiny_config(*extra), ukb_cache, tmp_path / "fewer", progress=False)
    outs = _run_two_processes_retrying(ukb_cache, multi_dir, extra, expected_rc=0)
    # what the run sees, and its summary, said once (by process 0)
    assert "jaxtl pretrain: 2 process(es), 4 cpu device(s) (2 on this process), global batch 4 (1 per device)" \
        in outs[0] and "process(es)" not in outs[1]
    assert ["final model:" in out for out in outs] == [True, False]
    single = [r["loss"] for r in steps_logged(tmp_path / "single")]
    multi = [r["loss"] for r in steps_logged(multi_dir)]
    np.testing.assert_allclose([r["loss"] for r in steps_logged(tmp_path / "fewer")], single, rtol=1e-3)
    assert [r["step"] for r in steps_logged(multi_dir)] == list(range(1, len(single) + 1)) and len(single) >= 3
    # Same batches, same dropout masks: equal up to float reduction order, which drifts slowly over steps.
    np.testing.assert_allclose(multi[:3], single[:3], rtol=1e-4)
    np.testing.assert_allclose(multi, single, rtol=1e-3)
    records = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("single", "multi")}
    val = {name: [r["val_mae"] for r in rs if "val_mae" in r] for name, rs in records.items()}
    assert len(val["multi"]) == 1
    np.testing.assert_allclose(val["multi"], val["single"], rtol=1e-3)
    finals = {name: [r["final"] for r in rs if "final" in r] for name, rs in records.items()}
    assert len(finals["multi"]) == 1 and "test_mae_best" in finals["multi"][0]  # best/ evaluated on the 2-process mesh
    assert finals["multi"][0]["test_mae"] == pytest.approx(finals["single"][0]["test_mae"], rel=1e-3)
    # the final checkpoint of 4 devices restores exactly on 1 device (this process): rerun here, the finished run
    # trains nothing and exports the restored state
    shutil.copytree(multi_dir, tmp_path / "restored")
    pretrain(tiny_config(*extra), ukb_cache, tmp_path / "restored", progress=False)
    jax.tree.map(np.testing.assert_array_equal, final_state(multi_dir), final_state(tmp_path / "restored"))


def _two_processes_failing(ukb_cache, workdirs, caches=None) -> list[tuple[int, str]]:
    """Two processes started with their own run directory (and cache): (exit status, output) of each."""
    port = _free_port()
    procs = []
    for pid in (0, 1):
        cmd, env = pretrain_command((caches or [ukb_cache] * 2)[pid], workdirs[pid], "epochs=1", devices=2)
        cmd += ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]


def test_processes_that_do_not_share_the_run_directory_are_refused(ukb_cache, tmp_path):
    """Each process given its own directory (no shared filesystem): every process stops with the reason, none
    waits in a collective (orbax had hung writing the checkpoint). A check that fails on one process only (its
    host lacks the cache) stops the others too, naming it (they had waited in the first collective until it timed
    out)."""
    for rc, out in _two_processes_failing(ukb_cache, [tmp_path / "host0", tmp_path / "host1"]):
        assert rc == 2 and "process(es) [1] do not see the run directory process 0 writes to" in out, out
    missing = tmp_path / "not-on-this-host"
    (rc0, out0), (rc1, out1) = _two_processes_failing(ukb_cache, [tmp_path / "run"] * 2, [ukb_cache, missing])
    assert rc1 == 2 and f"error: {missing}" in out1, out1
    assert rc0 == 2 and "error: process(es) [1] of 2 stopped before pretraining started: see their output" in out0, out0
