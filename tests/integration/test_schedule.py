"""When the callback runs (schedules, ``every_n_steps``), how runs are identified (``RunKey``, ``RunHistory``),
several callbacks in one Trainer (``state_key``), and reporters passed in as objects, each getting every run
and the end of the fit."""

from __future__ import annotations

import os
from typing import Any, Dict, List

import pytest
import torch

from lightning_influence import InfluenceCallback, InfluenceConfigError, RunKey
from lightning_influence.integration import Combined, EveryNEpochs, EveryNSteps, RunHistory, Schedule
from lightning_influence.reporting import Reporter, Scalars

from ..lit_models import LitClassifier, loaders, quiet_trainer
from ..problems import digits


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=150)


def test_schedules_are_small_predicates():
    assert [e for e in range(6) if EveryNEpochs(3).after_epoch(e, 0)] == [2, 5]
    assert [s for s in range(1, 13) if EveryNSteps(4).after_step(s, 0)] == [4, 8, 12]
    both = Combined(EveryNEpochs(2), EveryNSteps(5))
    assert both.after_epoch(1, 0) and not both.after_epoch(0, 0) and both.after_step(10, 0) and not both.after_step(7, 0)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InfluenceConfigError, match=rf"every_n_steps={bad!r} must be a positive integer k"):
            InfluenceCallback(every_n_steps=bad)
    with pytest.raises(InfluenceConfigError, match=r"schedule= or every_n_epochs=/every_n_steps=.*not both"):
        InfluenceCallback(schedule=EveryNSteps(2), every_n_epochs=1)
    with pytest.raises(InfluenceConfigError, match=r"schedule=3 must be a lightning_influence"):
        InfluenceCallback(schedule=3)


def test_run_keys_order_runs_and_history_reads_by_epoch():
    h: RunHistory = RunHistory()
    h[RunKey("final", 1, 12)] = "end"
    h[RunKey("step", 0, 5)] = "s5"
    h[RunKey("epoch", 0, 6)] = "e0"
    h[RunKey("step", 1, 10)] = "s10"
    assert [k.label for k in h] == ["step 5", "epoch 0", "step 10", "end of training"]
    assert h[0] == "e0" and h[1] == "end" and h.epochs() == [0, 1] and 2 not in h
    assert [k.file_stem for k in h] == ["results_step5", "results_epoch0", "results_step10", "results"]
    with pytest.raises(KeyError):
        h[RunKey("epoch", 1, 12)]  # noqa: B018


def test_every_n_steps_runs_after_those_optimizer_steps(tmp_path, data):
    """150 examples in batches of 32: 5 steps per epoch, 2 epochs; a run after steps 4 and 8, and at the end."""
    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_steps=4, on_error="raise",
                           query_dataloader=loaders(*data, batch_size=32)[1])
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb])
    trainer.fit(LitClassifier(), *loaders(*data, batch_size=32))
    keys = list(cb.history)
    assert [(k.trigger, k.epoch, k.global_step) for k in keys] == [("step", 0, 4), ("step", 1, 8), ("final", 1, 10)]
    assert [cb.history[k].settings["run"] for k in keys] == ["step", "step", "end of training"]
    assert [os.path.basename(p) for p in cb.history_paths.values()] == ["results_step4.pt", "results_step8.pt"]
    assert all(os.path.isfile(p) for p in cb.history_paths.values())
    # each step run explains the weights after that step: they differ run to run
    assert not torch.equal(cb.history[keys[0]].scores, cb.history[keys[1]].scores)


def test_two_callbacks_in_one_trainer_keep_their_own_state(tmp_path, data):
    first = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_epochs=1, save_results=False,
                              report=False, on_error="raise")
    second = InfluenceCallback(num_queries=3, solver="ekfac", save_results=False, report=False, on_error="raise")
    assert first.state_key != second.state_key
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[first, second, ckpt], enable_checkpointing=True)
    trainer.fit(LitClassifier(), *loaders(*data))
    assert first.history.epochs() == [0, 1] and first.results.num_queries == 2
    assert second.history.epochs() == [1] and second.results.num_queries == 3
    stored = torch.load(os.path.join(tmp_path, "ckpt", "last.ckpt"), weights_only=True)["callbacks"]
    assert {first.state_key, second.state_key} <= set(stored)


class Recorder(Reporter):
    """A reporter of the user's own: it sees every run inside the loop and the end of the fit."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: List[Any] = []

    def report_run(self, results, context) -> Dict[str, Any]:
        self.calls.append(("run", context.key.label, results.num_queries))
        return {}

    def report_fit(self, results, context) -> Dict[str, Any]:
        self.calls.append(("fit", context.key.label, len(context.history)))
        return {"recorded": True}


def test_reporters_are_plugins(tmp_path, data):
    rec = Recorder()
    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_epochs=1, on_error="raise",
                           reporters=[rec, Scalars()], save_results=False)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb])
    trainer.fit(LitClassifier(), *loaders(*data))
    assert rec.calls == [("run", "epoch 0", 2), ("run", "epoch 1", 2), ("fit", "end of training", 2)]
    assert cb.outputs["recorded"] and cb.outputs["html_path"] is None  # no HTML reporter was asked for
    assert not (tmp_path / "lightning_logs" / "version_0" / "influence" / "report.html").exists()
    with pytest.raises(InfluenceConfigError, match=r"reporters=.* must be a list of reporters"):
        InfluenceCallback(reporters=[object()])


def test_a_schedule_of_ones_own(tmp_path, data):
    class AtSteps(Schedule):
        def __init__(self, steps):
            self.steps = set(steps)

        def after_step(self, global_step: int, epoch: int) -> bool:
            return global_step in self.steps

    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], schedule=AtSteps([3]), on_error="raise",
                           query_dataloader=loaders(*data)[1], save_results=False, report=False)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    # 150 examples in batches of 64: the epoch's last step is step 3, so the end reuses that run
    assert [k.label for k in cb.history] == ["step 3"] and cb.results is cb.history[RunKey("step", 0, 3)]
