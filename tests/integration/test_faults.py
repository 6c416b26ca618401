"""Nothing lost, nothing silent: outputs that fail on their own, every checkable error before training,
random states left as they were, and Ctrl+C during influence. (Results files: test_persistence.py.)"""

from __future__ import annotations

import errno
import os
import random
import signal

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_influence import InfluenceCallback, InfluenceConfigError, InfluenceResults, compute_influence
from lightning_influence.errors import InfluenceInterrupted, InfluenceRuntimeError, ResultsFileError
from lightning_influence.guards import interruptible

from ..lit_models import LitClassifier, loaders, quiet_trainer
from ..problems import digits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=120)


@pytest.fixture(scope="module")
def results(data):
    torch.manual_seed(0)
    return compute_influence(nn.Linear(64, 10), data[0], data[1], num_queries=3, solver="exact", damping=0.1)


def assert_same(a: InfluenceResults, b: InfluenceResults) -> None:
    assert torch.equal(a.scores, b.scores) and torch.equal(a.query_indices, b.query_indices)
    assert torch.equal(a.train_indices, b.train_indices) and a.settings == b.settings


# ---------------------------------------------------------------- outputs fail on their own
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_results_file_failure_does_not_stop_the_report(tmp_path, data, monkeypatch):
    def broken(self, path):
        raise ResultsFileError(f"could not write {path}: [Errno 28 ENOSPC] No space left on device")

    monkeypatch.setattr(InfluenceResults, "save", broken)
    cb = InfluenceCallback(num_queries=2, solver="exact", damping=0.1)
    trainer = quiet_trainer(tmp_path, callbacks=[cb])
    with pytest.warns(UserWarning, match=r"could not write the results file \(ResultsFileError: .*ENOSPC.*\)\. "
                                         r"The other outputs were still written"):
        trainer.fit(LitClassifier(), *loaders(*data))
    assert isinstance(cb.results, InfluenceResults) and cb.results_path is None
    assert list(cb.output_errors) == ["results file"] and cb.error is cb.output_errors["results file"]
    assert os.path.isfile(cb.outputs["html_path"]) and cb.outputs["scalars"]


def test_report_failure_does_not_stop_the_results_file(tmp_path, data, monkeypatch):
    import lightning_influence.reporting.html as html_module

    def broken(path, text):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))

    monkeypatch.setattr(html_module, "write_html", broken)
    cb = InfluenceCallback(num_queries=2, solver="exact", damping=0.1)
    quiet_trainer(tmp_path, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert list(cb.output_errors) == ["HTML report"]
    assert_same(InfluenceResults.load(cb.results_path), cb.results)


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_on_error_raise_tries_every_output_first(tmp_path, data, monkeypatch):
    monkeypatch.setattr(InfluenceResults, "save", lambda self, path: (_ for _ in ()).throw(OSError(28, "full")))
    cb = InfluenceCallback(num_queries=2, solver="exact", damping=0.1, on_error="raise")
    with pytest.raises(InfluenceRuntimeError, match=r"could not write 1 output\(s\) \(results file: OSError: .*full\)"):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert isinstance(cb.results, InfluenceResults) and os.path.isfile(cb.outputs["html_path"])


def test_wandb_failure_does_not_stop_the_html_report(tmp_path, results, data, monkeypatch):
    import lightning_influence.integration.reporting as trainer_reporting
    import lightning_influence.reporting.wandb as wandb_reporter
    from lightning_influence.integration.reporting import report_influence

    def broken(*args, **kwargs):
        raise RuntimeError("W&B is unreachable")

    monkeypatch.setattr(trainer_reporting, "find_wandb_logger", lambda trainer: object())
    monkeypatch.setattr(wandb_reporter, "log_to_wandb", broken)
    out = report_influence(quiet_trainer(tmp_path), None, results, train_dataset=data[0], query_dataset=data[1],
                           report_path=tmp_path / "report.html")
    assert list(out["errors"]) == ["W&B"] and "unreachable" in str(out["errors"]["W&B"])
    assert out["html_path"] == str(tmp_path / "report.html") and os.path.isfile(out["html_path"])


# ---------------------------------------------------------------- checks before training
def _fails_before_training(tmp_path, cb, train_loader, val_loader, match, model=None, **trainer_kwargs):
    model = model or LitClassifier()
    with pytest.raises(InfluenceConfigError, match=match):
        quiet_trainer(tmp_path, callbacks=[cb], **trainer_kwargs).fit(model, train_loader, val_loader)
    assert model.trainer.global_step == 0


def test_empty_validation_set_fails_before_training(tmp_path, data):
    empty = TensorDataset(data[1].tensors[0][:0], data[1].tensors[1][:0])
    _fails_before_training(tmp_path, InfluenceCallback(num_queries=2), DataLoader(data[0], batch_size=32),
                           DataLoader(empty, batch_size=8), r"the query dataset is empty")


def test_missing_validation_set_fails_before_training(tmp_path, data):
    _fails_before_training(tmp_path, InfluenceCallback(num_queries=2), DataLoader(data[0], batch_size=32), None,
                           r"no query data.*val_dataloaders.*query_dataloader=")


def test_query_batches_in_another_format_fail_before_training(tmp_path, data):
    cb = InfluenceCallback(num_queries=2, query_dataloader=DataLoader(data[1].tensors[0], batch_size=8))
    _fails_before_training(tmp_path, cb, *loaders(*data), r"batches are Tensor, not \(inputs, targets\) pairs")


def test_query_label_out_of_range_fails_before_training(tmp_path, data):
    x, y = data[1].tensors
    y = y.clone()
    y[2] = 10
    cb = InfluenceCallback(num_queries=2, query_dataloader=DataLoader(TensorDataset(x, y), batch_size=8))
    _fails_before_training(tmp_path, cb, *loaders(*data), r"query example 2 has label 10, outside 0\.\.9: the "
                                                          r"model outputs 10 classes")


def test_exact_on_a_large_model_fails_before_training(tmp_path, data):
    model = LitClassifier(nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 10)))
    _fails_before_training(tmp_path, InfluenceCallback(num_queries=2, solver="exact"), *loaders(*data),
                           r"solver='exact' would form a 15010×15010 Hessian", model=model)


class Counting(Dataset):
    def __init__(self, ds):
        self.ds, self.reads = ds, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        return self.ds[i]


def test_exact_size_refused_before_any_pass_over_the_data(data):
    """Under damping='auto' too: no Lanczos pass, no loss pass, only the few examples of the format check."""
    train = Counting(data[0])
    model = nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 10))
    with pytest.raises(InfluenceConfigError, match=r"would form a 15010×15010 Hessian"):
        compute_influence(model, train, data[1], num_queries=2, solver="exact", damping="auto")
    assert train.reads <= 5  # the first 4 (read once for the loss contract) and the last (its __len__ check)


def test_report_path_under_a_file_fails_before_training(tmp_path, data):
    (tmp_path / "a_file").write_text("x")
    cb = InfluenceCallback(num_queries=2, report_path=tmp_path / "a_file" / "report.html")
    _fails_before_training(tmp_path, cb, *loaders(*data), r"report_path: .*report.html cannot be created because "
                                                          r".*a_file is a file, not a directory \(ENOTDIR\)")


def test_report_path_that_is_a_directory_fails_before_training(tmp_path, data):
    cb = InfluenceCallback(num_queries=2, report_path=tmp_path)
    _fails_before_training(tmp_path, cb, *loaders(*data), r"report_path: .* is a directory, not a file")


def test_influence_folder_that_is_a_file_fails_before_training(tmp_path, data):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="", version="v")
    os.makedirs(tmp_path / "v")
    (tmp_path / "v" / "influence").write_text("x")
    _fails_before_training(tmp_path, InfluenceCallback(num_queries=2), *loaders(*data),
                           r"results file: .*influence/results.pt cannot be created because .*influence is a file",
                           logger=logger)


# ---------------------------------------------------------------- random states
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_compute_influence_restores_every_random_state(data):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    model = nn.Linear(64, 10)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    compute_influence(model, data[0], data[1], num_queries=2, solver="lissa", damping=0.1, chunk_size=32)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_rng_restored_when_influence_fails(data):
    torch.manual_seed(2)
    model = nn.Linear(64, 10)
    state = torch.get_rng_state()
    x, y = data[0].tensors
    x = x.clone()
    x[50, 0] = float("nan")
    with pytest.raises(InfluenceRuntimeError, match="training example 50"):
        compute_influence(model, TensorDataset(x, y), data[1], num_queries=2, solver="exact", chunk_size=16)
    assert torch.equal(torch.get_rng_state(), state)


def _fit_then_draw(tmp_path, data, callbacks):
    pl.seed_everything(3, verbose=False)
    net = nn.Sequential(nn.Linear(64, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 10))
    model = LitClassifier(net, lr=0.1)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, *loaders(*data, batch_size=32))
    return [p.detach().clone() for p in model.parameters()], torch.rand(5), np.random.rand(3), random.random()


def test_fit_with_the_callback_draws_the_same_random_numbers(tmp_path, data):
    cb = InfluenceCallback(num_queries=2, solver="exact", chunk_size=16, report=False, save_results=False,
                           on_error="raise")
    with_cb = _fit_then_draw(tmp_path / "a", data, [cb])
    without = _fit_then_draw(tmp_path / "b", data, [])
    assert cb.results is not None
    assert all(torch.equal(a, b) for a, b in zip(with_cb[0], without[0]))  # training itself unchanged
    assert torch.equal(with_cb[1], without[1]) and np.array_equal(with_cb[2], without[2])
    assert with_cb[3] == without[3]


# ---------------------------------------------------------------- Ctrl+C
@pytest.fixture
def usual_ctrl_c():
    """Python's usual SIGINT handler for the test: a runner started in the background by a shell without job
    control inherits SIGINT ignored, and then Ctrl+C reaches no one (the guard leaves an ignored SIGINT alone)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_first_ctrl_c_stops_influence_only(tmp_path, data, usual_ctrl_c):
    cb = InfluenceCallback(num_queries=2, solver="exact", damping=0.1, chunk_size=16, on_error="raise")
    phases = []

    def press_ctrl_c(phase, done, total):
        phases.append(phase)
        if phase == "scoring":
            os.kill(os.getpid(), signal.SIGINT)

    cb._progress = lambda trainer: press_ctrl_c
    handler = signal.getsignal(signal.SIGINT)
    model = LitClassifier()
    trainer = quiet_trainer(tmp_path, enable_checkpointing=True, max_epochs=2, callbacks=[cb])
    try:
        with pytest.warns(UserWarning, match=r"Ctrl\+C stopped the influence computation; training, its weights "
                                             r"and checkpoints are kept"):
            trainer.fit(model, *loaders(*data))
    except (KeyboardInterrupt, SystemExit) as err:  # pragma: no cover - the failure this test guards against
        pytest.fail(f"Ctrl+C during influence ended the run: {err!r}")
    assert phases.count("scoring") == 1  # stopped at once
    assert isinstance(cb.error, InfluenceInterrupted) and cb.results is None
    assert trainer.state.finished and not trainer.interrupted and trainer.global_step > 0
    ckpt = trainer.checkpoint_callback.best_model_path
    assert ckpt and os.path.isfile(ckpt) and torch.load(ckpt, weights_only=False)["global_step"] == trainer.global_step
    assert signal.getsignal(signal.SIGINT) is handler


def test_second_ctrl_c_is_handled_as_usual(usual_ctrl_c):
    handler = signal.getsignal(signal.SIGINT)
    seen = []
    with pytest.raises(KeyboardInterrupt) as second:
        with interruptible():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(10**6):  # the handler runs between bytecodes
                    pass
            except InfluenceInterrupted as first:
                seen.append(first)
            assert signal.getsignal(signal.SIGINT) is handler  # the usual handler is back at once
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):
                pass
    assert len(seen) == 1 and not isinstance(second.value, InfluenceInterrupted)
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.parametrize("op", ["wraps it", "swallows it"])
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_ctrl_c_is_the_interrupt_whatever_op_was_running(tmp_path, data, usual_ctrl_c, op):
    """An op that catches the interrupt and raises its own error (the TorchScript interpreter raises a RuntimeError:
    5 of 24 Ctrl+C runs), or swallows it: still InfluenceInterrupted and the Ctrl+C warning, not a failure advising
    on_error='raise'."""
    cb = InfluenceCallback(num_queries=2, solver="exact", damping=0.1, chunk_size=16, on_error="raise")

    def press_ctrl_c_inside_an_op(phase, done, total):
        if phase != "scoring" or done > 16:
            return
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):  # the handler runs between bytecodes
                pass
        except KeyboardInterrupt as err:
            if op == "wraps it":
                raise RuntimeError("The following operation failed in the TorchScript interpreter.") from err

    cb._progress = lambda trainer: press_ctrl_c_inside_an_op
    model = LitClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(tmp_path, callbacks=[cb])
    with pytest.warns(UserWarning, match=r"InfluenceCallback: Ctrl\+C stopped the influence computation") as seen:
        trainer.fit(model, *loaders(*data))
    assert isinstance(cb.error, InfluenceInterrupted) and cb.results is None
    assert not any("on_error='raise'" in str(w.message) for w in seen)
    if op == "wraps it":
        assert isinstance(cb.error.__cause__, RuntimeError)
    assert trainer.state.finished and not trainer.interrupted
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))  # it trained, then stopped influence
    assert not list(tmp_path.rglob("results*.pt"))  # nothing written for the interrupted run


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_sigterm_during_influence_on_one_process_stops_it(tmp_path, data):
    """Lightning's SIGTERM handler only sets a flag on one process; the influence run stops at its next step."""
    cb = InfluenceCallback(num_queries=2, solver="exact", damping=0.1, chunk_size=16, on_error="raise")
    trainer = quiet_trainer(tmp_path, callbacks=[cb])
    phases = []

    def sigterm(phase, done, total):
        phases.append(phase)
        if phase == "scoring":
            trainer._signal_connector.received_sigterm = True  # what its handler does

    cb._progress = lambda trainer: sigterm
    with pytest.warns(UserWarning, match=r"InfluenceCallback: SIGTERM stopped the influence computation"):
        trainer.fit(LitClassifier(), *loaders(*data))
    assert isinstance(cb.error, InfluenceInterrupted) and cb.results is None and phases.count("scoring") == 1


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), "10", True])
def test_collective_timeout_must_be_positive_seconds(value):
    with pytest.raises(InfluenceConfigError, match=r"collective_timeout=.* must be a number of seconds > 0"):
        InfluenceCallback(collective_timeout=value)


def test_collective_timeout_takes_seconds_or_a_timedelta():
    import datetime

    assert InfluenceCallback(collective_timeout=datetime.timedelta(minutes=2)).collective_timeout == 120.0
    assert InfluenceCallback().collective_timeout == 600.0
