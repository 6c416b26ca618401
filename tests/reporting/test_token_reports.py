"""Readable text examples (``decode=``) and the per-token reports (``per_token=True``), end to end: a real Trainer
with a real offline ``WandbLogger`` and the callback, the HTML report and the W&B tables read back from the
files; and the errors and fallbacks of a bad ``decode``."""

from __future__ import annotations

import html as html_lib
import re
import warnings
from typing import Any, Dict, Iterator

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_influence import InfluenceCallback, InfluenceConfigError, compute_influence
from lightning_influence.objective import IGNORE_INDEX
from lightning_influence.reporting import Html, ReportContext, report
from lightning_influence.reporting.previews import ExampleCatalog
from lightning_influence.reporting.wandb import TOKEN_COLUMNS, TOKEN_KEY

from ..lit_models import quiet_trainer
from ..test_sequence_loss import TinyLM, lm_data
from ..wandb_reader import OfflineRun, wandb_offline_env

wandb = pytest.importorskip("wandb")

ALPHABET = "abcdefg"  # TinyLM's 7 tokens as characters
NUM_QUERIES, TOP_K = 3, 2


def decode(ids):
    return "".join(ALPHABET[i] for i in ids)


class LitLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyLM()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none").sum(1).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Iterator[Dict[str, Any]]:
    from pytorch_lightning.loggers import WandbLogger

    root = tmp_path_factory.mktemp("lm")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in wandb_offline_env(root).items():
            mp.setenv(k, v)
        torch.manual_seed(0)
        train, val = lm_data(n=32, seed=0), lm_data(n=8, seed=1)
        logger = WandbLogger(project="influence-test", save_dir=str(root), offline=True)
        cb = InfluenceCallback(num_queries=NUM_QUERIES, solver="exact", top_k=TOP_K, on_error="raise", per_token=True,
                               decode=decode)
        trainer = quiet_trainer(root, logger=logger, callbacks=[cb], max_epochs=3)
        trainer.fit(LitLM(), DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8))
        wandb.finish()
        wandb.teardown()
        with open(cb.outputs["html_path"], encoding="utf-8") as fh:
            page = fh.read()
        yield {"cb": cb, "run": OfflineRun.find(root, wait=10), "html": page, "train": train, "val": val}


def _text(tokens: torch.Tensor) -> str:
    return decode([int(t) for t in tokens if int(t) != IGNORE_INDEX])


def test_the_callback_keeps_token_scores_that_sum_to_the_scores(lm_run):
    res = lm_run["cb"].results
    assert lm_run["cb"].error is None and res.has_token_scores
    summed = torch.zeros_like(res.scores, dtype=torch.float64).index_add_(0, res.token_rows, res.token_scores.double())
    torch.testing.assert_close(summed, res.scores.double(), rtol=1e-4, atol=1e-4 * float(res.scores.abs().max()))


def test_html_shows_decoded_text_and_a_heat_map_per_query(lm_run):
    page, res, val, train = lm_run["html"], lm_run["cb"].results, lm_run["val"], lm_run["train"]
    assert "token ids" not in page  # every example is shown as text
    for q, qid in enumerate(res.query_indices.tolist()):
        x, y = val[qid]
        assert html_lib.escape(decode(x.tolist())) in page  # the query's input as text
        section = re.search(rf'<div class="tokens" id="tokens-{qid}".*?</div>', page, re.S)
        assert section is not None, f"no heat map for query {qid}"
        block = section.group(0)
        first_line = re.search(r"<tr data-kind=\"harmful\" data-train-id=\"(\d+)\".*?</tr>", block, re.S)
        assert first_line is not None
        train_id = int(first_line.group(1))
        assert train_id == int(res.top_harmful(q, TOP_K).indices[0])
        spans = re.findall(r'<span class="tok" data-position="(\d+)" data-token-id="(\d+)" data-score="([^"]+)"'
                           r'[^>]*>([^<]*)</span>', first_line.group(0))
        one = res.tokens_of(q)
        col = int((res.train_indices == train_id).nonzero())
        assert [int(p) for p, _, _, _ in spans] == one.positions.tolist()  # padding has no coloured cell
        assert "".join(t for _, _, _, t in spans) == _text(y)  # each token decoded
        assert [float(s) for _, _, s, _ in spans] == pytest.approx(one.scores[:, col].tolist(), rel=1e-6)
    for i in res.top_harmful(0, TOP_K).indices.tolist():  # training examples too
        assert html_lib.escape(decode(train[i][0].tolist())) in page


def test_wandb_token_table_and_decoded_previews(lm_run):
    run, res, val = lm_run["run"], lm_run["cb"].results, lm_run["val"]
    table = run.table(TOKEN_KEY)
    assert table.columns == TOKEN_COLUMNS
    recs = table.records()
    assert len(recs) == 2 * res.token_scores.shape[0]  # a harmful and a helpful row per scored token
    for rec in recs:
        q = res.row_of(rec["query_id"])
        x, y = val[rec["query_id"]]
        assert rec["token"] == ALPHABET[rec["token_id"]] and rec["token_id"] == int(y[rec["position"]])
        tok = res.tokens_of(q)
        j = tok.positions.tolist().index(rec["position"])
        col = int((res.train_indices == rec["train_id"]).nonzero())
        want = tok.scores[j].max() if rec["kind"] == "harmful" else tok.scores[j].min()
        assert rec["score"] == pytest.approx(float(want), rel=1e-5)
        assert float(tok.scores[j, col]) == pytest.approx(float(want), rel=1e-5)
        assert rec["train_preview"] == decode(lm_run["train"][rec["train_id"]][0].tolist())
    top = run.table("influence/top_examples").records()
    assert top and all(isinstance(r["preview"], str) and "token ids" not in r["preview"] for r in top)
    assert all(r["preview"] == decode(lm_run["train"][r["train_id"]][0].tolist()) for r in top)
    queries = run.table("influence/queries").records()
    assert [r["preview"] for r in queries] == [decode(val[i][0].tolist()) for i in res.query_indices.tolist()]
    assert all(r["label"] == _text(val[r["query_id"]][1]) for r in queries)  # the targets, decoded


# ---------------------------------------------------------------------------------------------- bad decode
def test_a_decode_that_is_not_callable_is_refused_by_name():
    with pytest.raises(InfluenceConfigError, match=r"decode='abc' is not callable; pass a function decode\(token_ids"):
        InfluenceCallback(decode="abc")
    with pytest.raises(InfluenceConfigError, match="decode=3 is not callable"):
        ReportContext(decode=3)
    with pytest.raises(InfluenceConfigError, match="per_token=1 must be True or False"):
        InfluenceCallback(per_token=1)


@pytest.mark.parametrize("bad", [lambda ids: 1 / 0, lambda ids: ids], ids=["raises", "returns-a-list"])
def test_a_failing_decode_falls_back_to_ids_and_the_report_is_written(tmp_path, bad):
    torch.manual_seed(0)
    data = lm_data(n=12)
    res = compute_influence(TinyLM(), data, query_indices=[0, 1], solver="exact", damping=2.0, per_token=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = report(res, [Html(tmp_path / "r.html")], ReportContext(train_dataset=data, query_dataset=data, decode=bad))
    assert out["errors"] == {}
    page = (tmp_path / "r.html").read_text()
    assert "token ids, decode failed)" in page and 'class="tokens"' in page
    msgs = [str(w.message) for w in caught if "decode failed" in str(w.message)]
    assert len(msgs) == 1 and "decode must be decode(token_ids: list[int]) -> str" in msgs[0]


def test_render_example_comes_first_and_decode_shows_its_ids():
    data = lm_data(n=4)
    cat = ExampleCatalog(data, render_example=lambda ex: ex[0][:2], decode=decode)
    assert cat.preview(0).text == decode(data[0][0][:2].tolist())
    assert ExampleCatalog(data, render_example=lambda ex: "custom", decode=decode).preview(0).text == "custom"
    plain = ExampleCatalog(data)
    assert "token ids" in plain.preview(0).text and plain.token_text(3) == "3"


def test_per_token_with_an_influence_loss_hook_is_refused_before_training(tmp_path):
    class Hooked(LitLM):
        def influence_loss(self, batch):
            x, y = batch
            return F.cross_entropy(self(x).transpose(1, 2), y, reduction="none").sum(1)

    data = lm_data(n=8)
    cb = InfluenceCallback(num_queries=2, solver="exact", per_token=True, on_error="raise")
    trainer = quiet_trainer(tmp_path, callbacks=[cb], max_steps=1)
    with pytest.raises(InfluenceConfigError, match="defines influence_loss"):
        trainer.fit(Hooked(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert trainer.global_step == 0
