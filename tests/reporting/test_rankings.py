"""Rankings: ``top_harmful`` lists only positive scores and ``top_helpful`` only negative ones, however large
``k``; a query is picked by its row of the scores or, explicitly, by its position in the query dataset;
and reports show a query without harmful (or helpful) examples as such."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceConfigError, InfluenceResults
from lightning_influence.reporting.content import query_views, suspects
from lightning_influence.reporting.html import render_html
from lightning_influence.reporting.previews import ExampleCatalog


@pytest.fixture
def res() -> InfluenceResults:
    return InfluenceResults(
        scores=torch.tensor([[3.0, -1.0, 2.0, -5.0, 0.0],
                             [-0.5, -2.0, -1.0, -4.0, -3.0]]),
        query_indices=torch.tensor([7, 42]),
        train_indices=torch.tensor([10, 11, 12, 13, 14]),
        query_losses=torch.tensor([1.0, 2.0]),
        settings={"solver": "exact", "damping": 0.01, "num_train_total": 5},
    )


def test_k_beyond_the_harmful_examples_returns_no_helpful_ones(res):
    harmful = res.top_harmful(0, k=10)
    assert harmful.indices.tolist() == [10, 12] and harmful.scores.tolist() == [3.0, 2.0]
    helpful = res.top_helpful(0, k=10)
    assert helpful.indices.tolist() == [13, 11] and helpful.scores.tolist() == [-5.0, -1.0]  # 0 is neither
    assert res.top_harmful(1, k=3).indices.tolist() == []  # every score negative: nothing harmful
    assert res.top_helpful(1, k=2).indices.tolist() == [13, 14]  # k still caps the list


def test_query_by_row_or_by_query_dataset_position(res):
    assert res.row_of(42) == 1
    by_id, by_row = res.top_helpful(query_id=42, k=3), res.top_helpful(row=1, k=3)
    assert torch.equal(by_id.indices, by_row.indices) and torch.equal(by_id.scores, by_row.scores)
    assert res.top_harmful(query_id=7).indices.tolist() == [10, 12]
    with pytest.raises(InfluenceConfigError, match=r"query_id=5 is not one of the 2 queries \(query dataset positions 7, 42\)"):
        res.top_harmful(query_id=5)
    with pytest.raises(InfluenceConfigError, match="pass exactly one of row= .* or query_id="):
        res.top_harmful(0, query_id=7)
    with pytest.raises(InfluenceConfigError, match="pass exactly one of row="):
        res.top_helpful()
    with pytest.raises(IndexError, match="row=7 is out of range for 2 queries .* pass query_id= instead"):
        res.top_harmful(7)  # 7 is a query_id here, not a row


def test_reports_show_a_query_without_harmful_examples(res):
    views = query_views(res, k=3)
    assert [len(v.harmful) for v in views] == [2, 0] and [len(v.helpful) for v in views] == [2, 3]
    assert all(e.score > 0 for v in views for e in v.harmful) and all(e.score < 0 for v in views for e in v.helpful)
    data = TensorDataset(torch.rand(50, 1, 8, 8), torch.arange(50) % 10)
    catalog = ExampleCatalog(data)
    text = render_html(res, views, suspects(res, 3), catalog, catalog)
    second = text.split('id="query-42"')[1].split("</article>")[0]
    assert "No harmful training examples (none has a positive score)" in second
    assert second.count('class="example helpful"') == 3 and 'class="example harmful"' not in second


def test_wandb_tables_take_a_query_without_harmful_examples(res):
    pytest.importorskip("wandb")
    from lightning_influence.reporting.wandb import _tables

    data = TensorDataset(torch.rand(50, 1, 8, 8), torch.arange(50) % 10)
    catalog = ExampleCatalog(data)
    tables = _tables(query_views(res, k=3), [], catalog, catalog)
    rows = [dict(zip(tables["influence/queries"].columns, r)) for r in tables["influence/queries"].data]
    assert rows[1]["harmful_ids"] == [] and rows[1]["harmful_previews"] is None
    assert rows[0]["harmful_ids"] == [10, 12]
    kinds = [r[4] for r in tables["influence/top_examples"].data]
    assert kinds.count("harmful") == 2 and kinds.count("helpful") == 5
