"""Nothing overwritten, nothing followed (issue #21): every fit writes its results, report and per-run files in
a folder of its own, resolved as Lightning resolves its checkpoints' (never ``.``, never an earlier fit's
folder); the report never follows a symbolic link and a failed write keeps the previous report whole; no output
writes onto the results, a checkpoint or another output's path (refused before training, naming both); an
interrupted write's temporary files are removed by the next write to that folder. Each test checks that nothing
outside the fit's own files changed."""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Dict

import pytest
import pytorch_lightning as pl
import torch

from lightning_influence import InfluenceCallback, InfluenceConfigError, InfluenceResults
from lightning_influence.persistence import _ErrorRecordingWriter, atomic_write_text, remove_stale_temporaries

from ..lit_models import LitClassifier, loaders, quiet_trainer
from ..problems import digits
from ..wandb_reader import wandb_offline_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=80)


def callback(**kwargs) -> InfluenceCallback:
    return InfluenceCallback(**{"num_queries": 2, "solver": "exact", "damping": 0.1, "params": ["net.bias"],
                                "on_error": "raise", **kwargs})


def snapshot(root) -> Dict[str, str]:
    """``{relative path: sha256 (or link target)}`` of every file under ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            else:
                with open(path, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def unchanged_outside(before: Dict[str, str], after: Dict[str, str], *own: str) -> bool:
    """Every file of ``before`` is still there, unchanged, except under the folders ``own`` (relative)."""
    mine = tuple(o.rstrip("/") + "/" for o in own)
    return all(after.get(k) == v for k, v in before.items() if not k.startswith(mine))


def fit(root, data, cb, **trainer_kwargs):
    trainer = quiet_trainer(root, callbacks=[cb], **trainer_kwargs)
    trainer.fit(LitClassifier(), *loaders(*data))
    return trainer


# ---------------------------------------------------------------- one folder per fit
def test_wandb_logger_without_save_dir_writes_beside_its_checkpoints(tmp_path, data, monkeypatch):
    """``WandbLogger(offline=True)`` without ``save_dir``: ``trainer.log_dir`` is ``.``, where the next run from the
    same folder overwrote the results and report. They go where ModelCheckpoint puts that run's checkpoints now
    (``./<project>/<run id>/``), one folder per run."""
    wandb = pytest.importorskip("wandb")
    for k, v in wandb_offline_env(tmp_path / "wandb-home").items():
        monkeypatch.setenv(k, v)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    paths = []
    for run in range(2):
        before = snapshot(tmp_path)
        cb = callback()
        trainer = fit(tmp_path / "root", data, cb, logger=pl.loggers.WandbLogger(offline=True),
                      enable_checkpointing=True)
        wandb.finish()
        ckpt_dir = os.path.abspath(trainer.checkpoint_callback.dirpath)  # relative, as Lightning resolves it
        assert os.path.dirname(cb.results_path) == os.path.join(os.path.dirname(ckpt_dir), "influence")
        run_id = trainer.logger.version
        assert cb.results_path == str(work / "lightning_logs" / run_id / "influence" / "results.pt")
        assert cb.outputs["html_path"] == str(work / "lightning_logs" / run_id / "influence" / "report.html")
        assert not (work / "influence").exists()
        assert unchanged_outside(before, snapshot(tmp_path), f"work/lightning_logs/{run_id}", "work/wandb", "wandb-home")
        paths.append(cb.results_path)
    assert paths[0] != paths[1] and InfluenceResults.load(paths[0]).scores.shape == (2, 80)
    wandb.teardown()


def test_a_second_fit_with_the_same_callback_gets_its_own_folder(tmp_path, data):
    """``logger=False`` (everything under ``default_root_dir``) and the same callback fitted twice: the first fit's
    results, report and per-epoch files are untouched and the second fit's folder has no stale per-run file."""
    cb = callback(every_n_epochs=1)
    fit(tmp_path, data, cb, logger=False, max_epochs=2)
    first = tmp_path / "influence"
    assert sorted(os.listdir(first)) == ["report.html", "results.pt", "results_epoch0.pt", "results_epoch1.pt"]
    before = snapshot(tmp_path)
    fit(tmp_path, data, cb, logger=False, max_epochs=1)
    second = tmp_path / "influence_v1"
    assert cb.results_path == str(second / "results.pt") and cb.outputs["html_path"] == str(second / "report.html")
    assert sorted(os.listdir(second)) == ["report.html", "results.pt", "results_epoch0.pt"]
    assert unchanged_outside(before, snapshot(tmp_path), "influence_v1")
    assert dict(cb.history_paths) == {k: str(second / "results_epoch0.pt") for k in cb.history_paths}


def test_a_new_run_from_the_same_folder_does_not_overwrite_the_last(tmp_path, data):
    fit(tmp_path, data, callback(), logger=False)
    before = snapshot(tmp_path)
    cb = callback()
    fit(tmp_path, data, cb, logger=False)
    assert cb.results_path == str(tmp_path / "influence_v1" / "results.pt")
    assert unchanged_outside(before, snapshot(tmp_path), "influence_v1")


def test_two_callbacks_of_one_fit_get_a_folder_each(tmp_path, data):
    a, b = callback(), callback(solver="cg")
    trainer = quiet_trainer(tmp_path, callbacks=[a, b], logger=False)
    trainer.fit(LitClassifier(), *loaders(*data))
    assert os.path.dirname(a.results_path) != os.path.dirname(b.results_path)
    assert InfluenceResults.load(a.results_path).solver == "exact" and InfluenceResults.load(b.results_path).solver == "cg"


def test_a_fit_that_writes_nothing_leaves_no_folder(tmp_path, data):
    fit(tmp_path, data, callback(), logger=False, fast_dev_run=True)
    assert not (tmp_path / "influence").exists()


# ---------------------------------------------------------------- links, full disks, temporaries
def test_the_report_never_follows_a_planted_symlink(tmp_path, data):
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    link = tmp_path / "out" / "report.html"
    link.parent.mkdir()
    link.symlink_to(outside)
    before = snapshot(tmp_path)
    cb = callback(report_path=link)
    fit(tmp_path / "run", data, cb)
    assert outside.read_text() == "not yours" and not link.is_symlink()
    assert link.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert unchanged_outside(before, snapshot(tmp_path), "run", "out")


def test_a_results_file_never_follows_a_planted_symlink(tmp_path, data):
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"not yours")
    link = tmp_path / "results.pt"
    link.symlink_to(outside)
    cb = callback()
    fit(tmp_path / "run", data, cb)
    res = cb.results
    res.save(link)
    assert outside.read_bytes() == b"not yours" and not link.is_symlink()
    assert torch.equal(InfluenceResults.load(link).scores, res.scores)


def test_a_full_disk_leaves_the_previous_report_whole(tmp_path, data, monkeypatch):
    """The second fit's report write fails half-way (ENOSPC): the first report is byte for byte as it was, no
    temporary file is left, and the warning names the errno and the fix."""
    path = tmp_path / "report.html"
    fit(tmp_path / "a", data, callback(report_path=path))
    before = snapshot(tmp_path)
    real = _ErrorRecordingWriter.write

    def full(self, data_):
        real(self, data_[: len(data_) // 2])
        err = OSError(errno.ENOSPC, "No space left on device")
        self.error = err
        raise err

    monkeypatch.setattr(_ErrorRecordingWriter, "write", full)
    cb = callback(report_path=path, on_error="warn", save_results=False)
    with pytest.warns(UserWarning, match=r"could not write the HTML report \(ResultsFileError: could not write .*"
                                         r"report.html: \[Errno 28 ENOSPC\].*the previous report.html is unchanged.*"
                                         r"Free some space"):
        fit(tmp_path / "b", data, cb)
    monkeypatch.undo()
    assert unchanged_outside(before, snapshot(tmp_path), "b") and "report.html" in before
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    assert isinstance(cb.results, InfluenceResults) and list(cb.output_errors) == ["HTML report"]


def test_an_interrupted_writes_temporaries_are_removed_by_the_next_write(tmp_path):
    """``.<name>.<pid>.<hex>.tmp`` of a process that is gone is removed by the next write to its folder; one of a
    live process and every other file stay."""
    dead = tmp_path / ".report.html.2147483646.0badcafe.tmp"  # no such process
    live = tmp_path / f".results.pt.{os.getppid()}.12345678.tmp"  # the test runner's parent: alive
    other = tmp_path / ".keep.123.tmp"  # not this pattern
    for f in (dead, live, other):
        f.write_bytes(b"partial")
    atomic_write_text(tmp_path / "report.html", "<!DOCTYPE html>")
    assert not dead.exists() and live.exists() and other.exists()
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name, "report.html"])
    assert remove_stale_temporaries(tmp_path) == []


# ---------------------------------------------------------------- no output onto another's path
def _refused(tmp_path, data, match, cb, **trainer_kwargs):
    before = snapshot(tmp_path)
    model = LitClassifier()
    with pytest.raises(InfluenceConfigError, match=match):
        quiet_trainer(tmp_path / "run", callbacks=[cb] + trainer_kwargs.pop("more", []), **trainer_kwargs).fit(
            model, *loaders(*data))
    assert model.trainer.global_step == 0
    assert unchanged_outside(before, snapshot(tmp_path), "run/lightning_logs")
    return before


def test_a_report_path_onto_a_checkpoint_is_refused_naming_both(tmp_path, data):
    ckpts = tmp_path / "ckpts"
    mc = pl.callbacks.ModelCheckpoint(dirpath=str(ckpts), save_last=True)
    _refused(tmp_path, data, rf"report_path {ckpts}/last.ckpt would overwrite ModelCheckpoint's checkpoints \({ckpts}\)",
             callback(report_path=ckpts / "last.ckpt"), more=[mc], enable_checkpointing=True)
    _refused(tmp_path, data, r"report_path .*model.ckpt is a checkpoint's path \(\*\.ckpt\)",
             callback(report_path=tmp_path / "model.ckpt"))


def test_a_report_path_onto_an_existing_results_file_is_refused(tmp_path, data):
    old = tmp_path / "influence" / "results.pt"
    fit(tmp_path, data, callback(), logger=False)
    assert old.is_file()
    _refused(tmp_path, data, rf"report_path {old} is an existing file that is not an HTML report.*report_path= another",
             callback(report_path=old))


def test_a_report_path_onto_the_resumed_checkpoint_is_refused(tmp_path, data):
    trainer = fit(tmp_path / "first", data, callback(report=False, save_results=False))
    ckpt = tmp_path / "resume.pt"
    trainer.save_checkpoint(str(ckpt))
    before = snapshot(tmp_path)
    model = LitClassifier()
    with pytest.raises(InfluenceConfigError, match=rf"report_path {ckpt} would overwrite the checkpoint this fit "
                                                   rf"resumed from \(ckpt_path\) \({ckpt}\)"):
        quiet_trainer(tmp_path / "run", callbacks=[callback(report_path=ckpt)], max_epochs=2).fit(
            model, *loaders(*data), ckpt_path=str(ckpt))
    assert unchanged_outside(before, snapshot(tmp_path), "run")


def test_two_callbacks_with_one_report_path_are_refused_naming_both(tmp_path, data):
    path = tmp_path / "report.html"
    _refused(tmp_path, data, rf"report_path {path} would overwrite InfluenceCallback #0's report \({path}\)",
             callback(report_path=path), more=[callback(report_path=path, num_queries=3)])
