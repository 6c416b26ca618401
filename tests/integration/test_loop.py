"""Influence inside the training loop (``every_n_epochs``): training goes on bit for bit as without the
callback, every run is kept (``history``, per-epoch files, a resumed fit gets it back), ``on_results`` acts
on later epochs, the HTML report shows how the top examples move, and precision/devices of training do not
change the scores."""

from __future__ import annotations

import copy
import os
import random
from typing import Any, Dict, List

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceCallback, InfluenceConfigError, InfluenceResults, compute_influence
from lightning_influence.reporting.content import query_views, suspects
from lightning_influence.reporting.evolution import kept_fractions, rankings
from lightning_influence.reporting.html import render_html
from lightning_influence.reporting.previews import ExampleCatalog

from ..lit_models import LitClassifier, loaders, quiet_trainer
from ..problems import digits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=160)


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_every_n_epochs_must_be_a_positive_int(value):
    with pytest.raises(InfluenceConfigError, match=rf"every_n_epochs={value!r} must be a positive integer k .* or "
                                                   r"None \(only when training ends\)"):
        InfluenceCallback(every_n_epochs=value)


def test_on_results_must_be_callable():
    with pytest.raises(InfluenceConfigError, match=r"on_results=3 is not callable; pass a function "
                                                   r"on_results\(trainer, pl_module, results\)"):
        InfluenceCallback(on_results=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- training undisturbed
class Probe(pl.Callback):
    """Records, at every on_train_epoch_end, what influence must leave alone: per-module modes, gradients,
    requires_grad flags, the optimizer's state and the random states."""

    def __init__(self) -> None:
        self.seen: List[Dict[str, Any]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        opt = trainer.optimizers[0].state_dict()
        self.seen.append({
            "modes": {n: m.training for n, m in pl_module.named_modules()},
            "flags": {n: p.requires_grad for n, p in pl_module.named_parameters()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()},
            "opt": copy.deepcopy(opt["state"]),
            "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
        })


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _dropout_adam_fit(root, data, callbacks, epochs=3):
    """A shuffled, dropout, Adam fit without validation (queries from query_dataloader), so the last step's
    gradients are still there at on_train_epoch_end."""
    pl.seed_everything(7, verbose=False)
    net = nn.Sequential(nn.Linear(64, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 10))
    model = LitClassifier(net, lr=0.01, weight_decay=1e-4, optimizer="adam")
    trainer = quiet_trainer(root, max_epochs=epochs, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(model, DataLoader(data[0], batch_size=32, shuffle=True))
    return model, trainer


def test_every_epoch_leaves_training_bit_identical(tmp_path, data):
    """Adam + dropout + a shuffled loader, influence after every epoch (EK-FAC draws random numbers): the
    weights, Adam's moments, gradients, modes and random states are those of a fit without the callback."""
    before, after = Probe(), Probe()
    qloader = DataLoader(data[1], batch_size=64)
    cb = InfluenceCallback(num_queries=3, query_dataloader=qloader, solver="ekfac", self_influence=True,
                           every_n_epochs=1, on_error="raise")
    with_cb, trainer = _dropout_adam_fit(tmp_path / "a", data, [before, cb, after])
    reference, ref_trainer = _dropout_adam_fit(tmp_path / "b", data, [])
    assert cb.history.epochs() == [0, 1, 2] and cb.error is None
    for (name, p), q in zip(with_cb.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert _same(trainer.optimizers[0].state_dict()["state"], ref_trainer.optimizers[0].state_dict()["state"])
    assert len(before.seen) == len(after.seen) == 3
    for b, a in zip(before.seen, after.seen):
        assert any(g is not None for g in b["grads"].values())  # there were gradients to keep
        assert _same(b, a)
    # every run is a real one: its own weights, its own results file
    assert [cb.history[e].settings["global_step"] for e in range(3)] == [5, 10, 15]
    assert not torch.equal(cb.history[0].scores, cb.history[2].scores)
    for e in range(3):
        assert torch.equal(InfluenceResults.load(cb.history_paths[e]).scores, cb.history[e].scores)
        assert cb.history_paths[e].endswith(f"influence/results_epoch{e}.pt")


class Counted:
    def __init__(self, monkeypatch):
        import lightning_influence.integration.callback as module

        self.calls, original = 0, module.compute_influence

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "compute_influence", counted)


def test_end_reuses_the_last_epoch_run_when_the_weights_are_unchanged(tmp_path, data, monkeypatch):
    counter = Counted(monkeypatch)
    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_epochs=1, on_error="raise")
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert counter.calls == 2 and cb.results is cb.history[1]
    assert cb.results_path.endswith("influence/results.pt") and os.path.isfile(cb.results_path)
    assert torch.equal(InfluenceResults.load(cb.results_path).scores, cb.history[1].scores)
    with open(cb.outputs["html_path"], encoding="utf-8") as fh:
        html = fh.read()
    top = rankings(cb.history, k=cb.top_k)
    for epoch in (0, 1):
        harmful = next(r for r in top if (r.epoch, r.kind, r.query_id) == (epoch, "harmful", None))
        row = html[html.index(f'<tr data-epoch="{epoch}">'):]
        assert f'data-kind="harmful" data-ids="{",".join(map(str, harmful.train_ids))}"' in row.split("</tr>")[0]


class ShiftAtEnd(pl.Callback):
    """Changes the weights in on_train_end without an optimizer step, as weight averaging does."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.net.bias.add_(0.5)


def test_end_recomputes_when_the_weights_changed_at_the_end(tmp_path, data, monkeypatch):
    counter = Counted(monkeypatch)
    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_epochs=1, on_error="raise")
    model = LitClassifier()
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[ShiftAtEnd(), cb]).fit(model, *loaders(*data))
    assert counter.calls == 3 and cb.history.epochs() == [0, 1]
    assert cb.results is cb.history[1] and cb.results.settings["run"] == "end of training"
    ref = compute_influence(model, data[0], data[1], query_indices=cb.results.query_indices.tolist(), solver="exact",
                            params=["net.bias"], damping=cb.results.damping)
    torch.testing.assert_close(cb.results.scores, ref.scores)  # the shifted weights'


def test_every_second_epoch_and_the_end(tmp_path, data):
    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_epochs=2, on_error="raise")
    quiet_trainer(tmp_path, max_epochs=3, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert cb.history.epochs() == [1, 2] and cb.history_paths.epochs() == [1]
    assert [cb.history[e].settings["run"] for e in (1, 2)] == ["epoch end", "end of training"]
    assert cb.history[2].settings["global_step"] == 9  # 3 batches × 3 epochs
    # every logger gets each run's scalars with its epoch, at its step (here the CSV logger)
    import csv

    with open(os.path.join(os.path.dirname(os.path.dirname(cb.results_path)), "metrics.csv")) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("influence/epoch")]
    assert [(float(r["influence/epoch"]), int(r["step"])) for r in rows] == [(1.0, 6)]
    assert float(rows[0]["influence/score_max"]) == pytest.approx(float(cb.history[1].scores.max()), rel=1e-6)


def test_end_only_keeps_one_run_under_the_last_epoch(tmp_path, data):
    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], on_error="raise")
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert cb.history.epochs() == [1] and cb.history[1] is cb.results and cb.history_paths == {}


# ---------------------------------------------------------------- on_results
class Weighted(LitClassifier):
    """Per-example weights (a buffer) in the training loss; batches ``(x, y, index)``."""

    def __init__(self, n: int) -> None:
        super().__init__(lr=0.5, weight_decay=1e-3)
        self.register_buffer("sample_weight", torch.ones(n))

    def influence_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        w = self.sample_weight[batch[2]]
        return (self.influence_loss(batch) * w).sum() / w.sum().clamp_min(1.0)


class DropAt(pl.Callback):
    """Zeroes given weights at given epochs' ends (the reference for on_results)."""

    def __init__(self, drops: Dict[int, List[int]]) -> None:
        self.drops = drops

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.sample_weight[self.drops.get(trainer.current_epoch, [])] = 0.0


def _weighted_fit(root, train, val, callbacks):
    pl.seed_everything(3, verbose=False)
    model = Weighted(len(train))
    quiet_trainer(root, max_epochs=3, callbacks=callbacks).fit(model, *loaders(train, val))
    return model


def test_on_results_down_weights_suspects_for_the_next_epochs(tmp_path, data):
    x, y = data[0].tensors
    train, val = TensorDataset(x, y, torch.arange(len(x))), TensorDataset(*data[1].tensors, torch.arange(len(data[1])))
    calls: List[Any] = []

    def drop_suspects(trainer, pl_module, results):
        ids = results.top_self_influence(4).indices.tolist()
        calls.append((results.settings["epoch"], ids))
        pl_module.sample_weight[ids] = 0.0

    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], self_influence=True, every_n_epochs=1,
                           on_results=drop_suspects, on_error="raise")
    model = _weighted_fit(tmp_path / "a", train, val, [cb])
    dropped = dict(calls[:3])
    assert [e for e, _ in calls[:3]] == [0, 1, 2]  # (a 4th call: the end recomputes when epoch 2's drop changed the buffer)
    zeros = set(torch.nonzero(model.sample_weight == 0).flatten().tolist())
    assert zeros == {i for _, ids in calls for i in ids} and len(zeros) >= 4
    # training after epoch 0 saw the weights on_results set: the same fit with the drops made by a plain
    # callback ends with bit-identical weights, and a fit without them does not
    same = _weighted_fit(tmp_path / "b", train, val, [DropAt({0: dropped[0], 1: dropped[1]})])
    plain = _weighted_fit(tmp_path / "c", train, val, [])
    assert all(torch.equal(p, q) for p, q in zip(model.net.parameters(), same.net.parameters()))
    assert not torch.equal(model.net.weight, plain.net.weight)


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_on_results_failure_follows_on_error(tmp_path, data, on_error):
    def broken(trainer, pl_module, results):
        raise ValueError("no such column")

    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_epochs=1, on_results=broken,
                           on_error=on_error)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb])
    if on_error == "raise":
        with pytest.raises(ValueError, match="no such column"):
            trainer.fit(LitClassifier(), *loaders(*data))
        assert cb.history.epochs() == [0] and trainer.current_epoch == 0
        return
    with pytest.warns(UserWarning, match=r"InfluenceCallback failed \(ValueError: no such column\) at the end of epoch 0"):
        trainer.fit(LitClassifier(), *loaders(*data))
    assert trainer.state.finished and trainer.current_epoch == 2
    assert cb.history.epochs() == [0, 1] and cb.errors.epochs() == [0, 1]
    assert all(isinstance(e, ValueError) for e in cb.errors.values())
    assert cb.error is None and cb.results is cb.history[1]  # the end reused epoch 1's run: no on_results, no error


# ---------------------------------------------------------------- resume
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_resumed_fit_gets_the_history_back(tmp_path, data):
    from pytorch_lightning.callbacks import ModelCheckpoint

    kwargs = dict(num_queries=2, solver="exact", params=["net.bias"], self_influence=True, every_n_epochs=1,
                  on_error="raise")
    first = InfluenceCallback(**kwargs)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    quiet_trainer(tmp_path / "a", max_epochs=2, enable_checkpointing=True, callbacks=[first, ckpt]).fit(
        LitClassifier(), *loaders(*data))
    last = os.path.join(tmp_path, "ckpt", "last.ckpt")
    stored = torch.load(last, weights_only=True)["callbacks"][first.state_key]
    assert sorted(k["epoch"] for k, _ in stored["runs"]) == [0, 1]  # this epoch's run is in the checkpoint saved after it

    second = InfluenceCallback(**kwargs)
    restored: Dict[int, InfluenceResults] = {}

    class Look(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            restored.update(second.history)

    quiet_trainer(tmp_path / "b", max_epochs=3, callbacks=[second, Look()]).fit(LitClassifier(), *loaders(*data),
                                                                              ckpt_path=last)
    assert sorted({k.epoch for k in restored}) == [0, 1] and second.history.epochs() == [0, 1, 2]
    for e in (0, 1):
        assert torch.equal(second.history[e].scores, first.history[e].scores)
        assert torch.equal(second.history[e].self_influence, first.history[e].self_influence)
        assert second.history[e].settings == first.history[e].settings
    assert second.history_paths[0] == first.history_paths[0]
    assert second.history[2].settings["global_step"] == 9


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_a_fresh_fit_starts_a_new_history(tmp_path, data):
    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_epochs=1, on_error="raise")
    quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    quiet_trainer(tmp_path / "b", max_epochs=1, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert cb.history.epochs() == [0]


def test_load_state_dict_refuses_another_format():
    with pytest.raises(InfluenceConfigError, match=r"InfluenceCallback state has format 99; this version reads "
                                                   r"format 1"):
        InfluenceCallback().load_state_dict({"format": 99})


# ---------------------------------------------------------------- run conditions
def test_fast_dev_run_computes_nothing_in_the_loop(tmp_path, data, monkeypatch):
    counter = Counted(monkeypatch)
    cb = InfluenceCallback(num_queries=2, solver="exact", every_n_epochs=1, on_error="raise")
    quiet_trainer(tmp_path, callbacks=[cb], fast_dev_run=True).fit(LitClassifier(), *loaders(*data))
    assert counter.calls == 0 and cb.history == {} and cb.results is None


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_limited_batches_in_the_loop(tmp_path, data):
    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_epochs=1, on_error="raise")
    quiet_trainer(tmp_path, callbacks=[cb], max_epochs=2, limit_train_batches=1).fit(LitClassifier(), *loaders(*data))
    assert [cb.history[e].settings["global_step"] for e in (0, 1)] == [1, 2]
    assert all(r.num_train == len(data[0]) for r in cb.history.values())


def test_epochs_before_the_first_validation_are_skipped_with_a_line(tmp_path, data, caplog):
    """check_val_every_n_epoch=2: Lightning loads the validation data (the queries) at epoch 1's validation."""
    import logging

    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], every_n_epochs=1, on_error="raise")
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path, max_epochs=3, check_val_every_n_epoch=2, callbacks=[cb]).fit(LitClassifier(),
                                                                                             *loaders(*data))
    assert cb.history.epochs() == [1, 2] and cb.errors == {}
    assert [m for m in caplog.messages if "no influence at the end of epoch" in m] == [
        "InfluenceCallback: no influence at the end of epoch 0: Lightning has not loaded the validation data yet "
        "(check_val_every_n_epoch > 1); pass query_dataloader= to have queries at every epoch."]


def test_checkpoint_state_size_is_what_the_docstring_says(data):
    """Per run about (4·(Q+1) + 8)·N bytes (float32 scores and self-influence, int64 train indices)."""
    import io

    res = compute_influence(nn.Linear(64, 10), data[0], data[1], num_queries=16, solver="exact", damping=0.1,
                            self_influence=True)
    cb = InfluenceCallback()
    cb.history = {0: res, 1: copy.deepcopy(res)}  # distinct storages (torch.save shares equal ones)
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    n, q = len(data[0]), 16
    assert 2 * (4 * (q + 1) + 8) * n < buf.tell() < 2 * (4 * (q + 1) + 8) * n + 64 * 1024


# ---------------------------------------------------------------- the report across epochs
def _results(scores, self_influence=None, queries=(0, 1), step=0) -> InfluenceResults:
    s = torch.tensor(scores, dtype=torch.float32)
    return InfluenceResults(
        scores=s, query_indices=torch.tensor(queries), train_indices=torch.arange(s.shape[1]),
        query_losses=torch.ones(len(queries)),
        self_influence=None if self_influence is None else torch.tensor(self_influence, dtype=torch.float32),
        settings={"global_step": step, "num_train_total": s.shape[1]},
    )


@pytest.fixture
def history():
    # 5 training examples, 2 queries; epoch 0 → 2: the most harmful example on average moves from 0 to 3
    return {
        0: _results([[4, 1, -2, 0.5, -1], [2, 1, -4, 0.5, -1]], [-5, -1, -3, -0.5, -2], step=10),
        2: _results([[1, 3, -2, 6, -1], [-1, 0, -4, 4, -3]], [-5, -4, -3, -0.5, -2], step=30),
    }


def test_rankings_follow_the_top_examples(history):
    r = {(x.epoch, x.kind, x.query_id): x for x in rankings(history, k=2, suspects_k=2)}
    assert r[0, "harmful", None].train_ids == [0, 1] and r[0, "harmful", None].kept is None
    assert r[2, "harmful", None].train_ids == [3, 1]  # mean scores 5 and 1.5
    assert r[2, "harmful", None].previous_ranks == [None, 2] and r[2, "harmful", None].kept == 1
    assert r[2, "helpful", None].train_ids == [2, 4] and r[2, "helpful", None].kept == 2
    assert r[2, "self_influence", None].train_ids == [0, 1] and r[2, "self_influence", None].previous_ranks == [1, None]
    assert r[2, "harmful", 1].train_ids == [3] and r[2, "harmful", 1].kept == 0  # query 1: only one positive score
    assert r[2, "harmful", 1].scores == [4.0]
    assert kept_fractions(history, k=2, suspects_k=2) == {
        "influence/over_epochs/harmful_kept": 0.5, "influence/over_epochs/helpful_kept": 1.0,
        "influence/over_epochs/self_influence_kept": 0.5}
    assert kept_fractions({0: history[0]}, k=2) == {}


def test_html_shows_the_top_examples_across_epochs(history):
    catalog = ExampleCatalog(TensorDataset(torch.zeros(5, 3), torch.arange(5)))
    last = history[2]
    text = render_html(last, query_views(last, 2), suspects(last, 2), catalog, catalog, history=history, top_k=2,
                       self_influence_k=2)
    assert '<a href="#over-epochs">' in text
    section = text[text.index('<section id="over-epochs">'):text.index("</section>", text.index('id="over-epochs"'))]
    assert '<tr data-epoch="0"><td>0</td><td>10</td>' in section and '<tr data-epoch="2"><td>2</td><td>30</td>' in section
    row2 = section[section.index('<tr data-epoch="2">'):]
    assert 'data-kind="harmful" data-ids="3,1"' in row2 and 'data-kept="1">1/2<' in row2
    assert '<span class="tid new" data-train-id="3"' in row2 and '<span class="tid" data-train-id="1"' in row2
    assert 'data-kind="self_influence" data-ids="0,1"' in row2
    assert 'id="over-epochs-per-query"' in section and '<tr data-query-id="1" data-epoch="2">' in section
    single = render_html(last, query_views(last, 2), [], catalog, catalog, history={2: last})
    assert 'id="over-epochs"' not in single


# ---------------------------------------------------------------- precision and devices
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "64-true"])
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_training_precision_does_not_change_the_maths(tmp_path, data, precision):
    """Training under autocast or in float64, influence in float32 with autocast off: the scores of
    compute_influence on the trained model. (On the CPU Lightning runs "16-mixed" as "bf16-mixed".)"""
    torch.manual_seed(0)
    model = LitClassifier(nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)), lr=0.2)
    cb = InfluenceCallback(num_queries=3, solver="exact", damping=0.5, self_influence=True, every_n_epochs=1,
                           on_error="raise")
    quiet_trainer(tmp_path, max_epochs=2, precision=precision, callbacks=[cb]).fit(model, *loaders(*data))
    res = cb.results
    assert res.scores.dtype == torch.float32 and res.settings["dtype"] == "float32"
    if precision == "64-true":
        assert next(model.parameters()).dtype == torch.float64
    ref = compute_influence(model, data[0], data[1], query_indices=res.query_indices.tolist(), solver="exact",
                            damping=0.5, self_influence=True)
    torch.testing.assert_close(res.scores, ref.scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.self_influence, ref.self_influence, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fit_computes_on_the_gpu_and_returns_cpu_results(tmp_path, data):
    torch.manual_seed(0)
    model = LitClassifier(nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)), lr=0.2)
    cb = InfluenceCallback(num_queries=3, solver="exact", damping=0.5, self_influence=True, every_n_epochs=1,
                           on_error="raise")
    quiet_trainer(tmp_path, accelerator="gpu", devices=1, max_epochs=2, callbacks=[cb]).fit(model, *loaders(*data))
    res = cb.results
    assert res.settings["device"].startswith("cuda") and res.scores.device.type == "cpu"
    assert all(r.scores.device.type == "cpu" for r in cb.history.values())
    ref = compute_influence(copy.deepcopy(model).cpu(), data[0], data[1], query_indices=res.query_indices.tolist(),
                            solver="exact", damping=0.5, self_influence=True)
    torch.testing.assert_close(res.scores, ref.scores, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(res.self_influence, ref.self_influence, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- W&B across epochs
@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_wandb_run_shows_every_epoch_and_the_movement(tmp_path, data):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    from lightning_influence.reporting.wandb import OVER_EPOCHS_COLUMNS, OVER_EPOCHS_KEY

    from ..wandb_reader import wandb_offline_env
    from ..wandb_reader import OfflineRun

    with pytest.MonkeyPatch.context() as mp:
        for k, v in wandb_offline_env(tmp_path).items():
            mp.setenv(k, v)
        logger = WandbLogger(project="influence-loop", save_dir=str(tmp_path), offline=True)
        cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], top_k=3, self_influence=True,
                               every_n_epochs=1, on_error="raise")
        quiet_trainer(tmp_path, logger=logger, max_epochs=3, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
        wandb.finish()
        wandb.teardown()
    run = OfflineRun.find(tmp_path, wait=10)
    assert cb.errors == {}
    # one row per epoch run (scalars at that step, with the epoch), then the final report's row
    epoch_rows = run.rows_with("influence/epoch")
    assert [r["influence/epoch"] for r in epoch_rows] == [0, 1, 2]
    assert [r["trainer/global_step"] for r in epoch_rows] == [3, 6, 9]
    for r, e in zip(epoch_rows, range(3)):
        assert r["influence/score_max"] == pytest.approx(float(cb.history[e].scores.max()), rel=1e-6)
    assert "influence/queries" in run.row_with("influence/queries")  # the full tables once, at the end
    # the movement table, re-logged from the second run on; its last version has every run
    assert len(run.rows_with(OVER_EPOCHS_KEY)) == 3  # epochs 1, 2 and the final report
    table = run.table(OVER_EPOCHS_KEY, occurrence=-1)
    assert table.columns == OVER_EPOCHS_COLUMNS
    recs = table.records()
    assert sorted({r["epoch"] for r in recs}) == [0, 1, 2]
    expected = {(x.epoch, x.kind, x.query_id): x for x in rankings(cb.history, k=3)}
    for (epoch, kind, query_id), ranking in expected.items():
        rows = [r for r in recs if (r["epoch"], r["kind"], r["query_id"]) == (epoch, kind, query_id)]
        assert [r["train_id"] for r in rows] == ranking.train_ids
        assert [r["previous_rank"] for r in rows] == ranking.previous_ranks
        assert [r["new"] for r in rows] == [ranking.kept is not None and p is None for p in ranking.previous_ranks]
    kept = kept_fractions(cb.history, k=3)
    assert set(kept) == {f"influence/over_epochs/{k}_kept" for k in ("harmful", "helpful", "self_influence")}
    for key, value in kept.items():
        assert epoch_rows[-1][key] == pytest.approx(value)
    # the artifact holds every epoch's results file beside the final one
    files = run.artifact_of_type("influence-scores").files
    assert sorted(files) == ["epoch_0/results.pt", "epoch_1/results.pt", "epoch_2/results.pt", "report.html",
                             "results.pt"]
