"""The loss contract, checked on the first real examples (issue #21): a loss that is not one finite value per
example of the batch, or the default cross-entropy on targets it cannot mean, is refused with the shapes and the
fix; raw errors of the model or the dataset become messages naming the layer and the fix. In a Trainer all of
this happens before the first training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_influence import InfluenceCallback, InfluenceConfigError, compute_influence
from lightning_influence.contract import REGRESSION_LOSS

from .lit_models import LitClassifier, quiet_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _regression(n: int = 24, outputs: int = 1, flat_targets: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.randn(3, outputs, generator=g) + 0.1 * torch.randn(n, outputs, generator=g)
    return TensorDataset(x, y[:, 0] if flat_targets and outputs == 1 else y)


def _classes(n: int = 24, classes: int = 3):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randint(0, classes, (n,), generator=g))


def _weights(model: nn.Module):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model: nn.Module, before) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


# ---------------------------------------------------------------- one loss per example, the same alone
def test_a_loss_that_broadcasts_is_refused_with_the_shapes():
    """The advice the old message gave: with outputs [B, 1] and targets [B] it is [B, B] summed to [B], accepted
    and wrong. Now refused, naming both shapes and the loss that works."""
    model = nn.Linear(3, 1)
    before = _weights(model)
    broadcasting = lambda out, y: ((out - y) ** 2).reshape(len(out), -1).sum(1)  # noqa: E731
    with pytest.raises(InfluenceConfigError) as err:
        compute_influence(model, _regression(), num_queries=2, solver="exact", loss_fn=broadcasting)
    msg = str(err.value)
    assert "in a batch of 4 but" in msg and "alone: each example's loss must depend on that example only" in msg
    assert "(outputs [4, 1], targets [4].)" in msg and "[B, 1] − [B] is [B, B]" in msg and REGRESSION_LOSS in msg
    assert _unchanged(model, before)


def test_the_suggested_regression_loss_is_least_squares_for_flat_targets():
    """The advice now reshapes the targets: outputs [B, 1] against targets [B] give the closed-form answer."""
    data = _regression()
    model = nn.Linear(3, 1).double()
    lam = 0.1
    res = compute_influence(model, data, query_indices=[0, 5], solver="exact", damping=lam, dtype=torch.float64,
                            loss_fn=eval(REGRESSION_LOSS.split("=", 1)[1]))
    x, y = (t.double() for t in data.tensors)
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    w = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    grads = 2 * (xt @ w - y)[:, None] * xt
    hessian = 2 * xt.T @ xt / len(x) + lam * torch.eye(4, dtype=x.dtype)
    torch.testing.assert_close(res.scores, -grads[[0, 5]] @ torch.linalg.solve(hessian, grads.T))


def test_a_loss_that_mixes_the_batch_is_refused():
    """A batch-normalised loss (each example divided by the batch's mean loss) is not per example."""
    mixing = lambda out, y: F.cross_entropy(out, y, reduction="none") / F.cross_entropy(out, y).detach()  # noqa: E731
    with pytest.raises(InfluenceConfigError, match=r"loss_fn\(outputs, targets\) gives training example \d+ the loss "
                                                   r".* in a batch of 4 but .* alone.*no batch means or sums"):
        compute_influence(nn.Linear(3, 3), _classes(), num_queries=2, solver="exact", loss_fn=mixing)


def test_influence_loss_checked_on_the_queries_before_training(tmp_path):
    """``influence_loss`` of the wrong shape on the query batches only (they have another format): refused before
    the first training step, with the shape, on the queries."""

    class Hooked(LitClassifier):
        def influence_loss(self, batch):
            x, y = batch[0], batch[1]
            per = F.cross_entropy(self(x), y, reduction="none")
            return per if len(batch) == 2 else per[:, None] * torch.ones(1, 2)  # the queries carry a third item

    train = _classes(40)
    x, y = train.tensors
    queries = TensorDataset(x[:8], y[:8], torch.zeros(8))
    model = Hooked(nn.Linear(3, 3))
    before = _weights(model)
    cb = InfluenceCallback(num_queries=2, solver="exact", query_dataloader=DataLoader(queries, batch_size=4))
    with pytest.raises(InfluenceConfigError, match=r"Hooked\.influence_loss\(batch\) returned shape \(4, 2\) for a "
                                                   r"batch of 4 examples.*one loss per example, shape \[B\]"):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model, DataLoader(train, batch_size=8),
                                                    DataLoader(queries, batch_size=8))
    assert model.trainer.global_step == 0 and _unchanged(model, before)
    assert not list(tmp_path.rglob("results*.pt")) and not list(tmp_path.rglob("*.html"))


def test_a_broadcasting_loss_fails_before_training(tmp_path):
    class Regressor(LitClassifier):
        def training_step(self, batch, batch_idx):
            return F.mse_loss(self(batch[0])[:, 0], batch[1])

        def validation_step(self, batch, batch_idx):
            pass

    model = Regressor(nn.Linear(3, 1))
    cb = InfluenceCallback(num_queries=2, solver="exact",
                           loss_fn=lambda out, y: ((out - y) ** 2).reshape(len(out), -1).sum(1))
    with pytest.raises(InfluenceConfigError, match=r"\(outputs \[4, 1\], targets \[4\]\.\).*view_as"):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model, DataLoader(_regression(), batch_size=8),
                                                    DataLoader(_regression(), batch_size=8))
    assert model.trainer.global_step == 0


# ---------------------------------------------------------------- the default cross-entropy's targets
def test_two_output_regression_with_the_default_loss_is_refused():
    """Trained with MSE on [B, 2] targets: the default cross-entropy would score it silently (it accepts floating
    targets of the outputs' shape as probabilities). They are not probabilities: refused, naming loss_fn=."""
    with pytest.raises(InfluenceConfigError) as err:
        compute_influence(nn.Linear(3, 2), _regression(outputs=2), num_queries=2, solver="exact")
    msg = str(err.value)
    assert "outputs [4, 2], targets [4, 2] (torch.float32)" in msg and "are not class probabilities" in msg
    assert "regression with 2 outputs" in msg and REGRESSION_LOSS in msg


def test_one_output_regression_with_the_default_loss_is_refused():
    with pytest.raises(InfluenceConfigError, match=r"outputs \[4, 1\], targets \[4\].*looks like regression.*"
                                                   + r"view_as\(out\)"):
        compute_influence(nn.Linear(3, 1), _regression(), num_queries=2, solver="exact")


def test_class_probabilities_are_still_the_default_losss_targets():
    g = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(24, 3, generator=g), dim=1)
    res = compute_influence(nn.Linear(3, 3), TensorDataset(torch.randn(24, 3, generator=g), soft), num_queries=2,
                            solver="exact")
    assert res.scores.shape == (2, 24) and bool(torch.isfinite(res.scores).all())


def test_float_class_labels_name_the_cast():
    x, y = _classes().tensors
    with pytest.raises(InfluenceConfigError, match=r"floating-point class labels \(outputs \[4, 3\], targets \[4\] "
                                                   r"\(torch.float32\)\).*integer class indices.*y.long\(\)"):
        compute_influence(nn.Linear(3, 3), TensorDataset(x, y.float()), num_queries=2, solver="exact")


# ---------------------------------------------------------------- raw errors named
class _Tuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x), x


class _Dict(_Tuple):
    def forward(self, x):
        return {"logits": self.lin(x)}


@pytest.mark.parametrize("model, shown", [(_Tuple, "a tuple"), (_Dict, r"a dict with keys \['logits'\]")])
def test_a_model_returning_a_tuple_or_dict_names_loss_fn(model, shown):
    with pytest.raises(InfluenceConfigError, match=rf"the model returns {shown}, not a tensor of logits.*Pass loss_fn= "
                                                   r"taking that output.*influence_loss"):
        compute_influence(model(), _classes(), num_queries=2, solver="exact")


def test_a_loss_fn_taking_the_tuple_works():
    res = compute_influence(_Tuple(), _classes(), num_queries=2, solver="exact",
                            loss_fn=lambda out, y: F.cross_entropy(out[0], y, reduction="none"))
    assert res.scores.shape == (2, 24) and res.query_predictions is None


def test_integer_inputs_to_a_linear_layer_name_the_dtype_and_where_to_convert():
    x, y = _classes().tensors
    with pytest.raises(InfluenceConfigError, match=r"their inputs are torch.int64 \(shape \[4, 3\]\) and a floating "
                                                   r"layer cannot take them.*x.float\(\).*influence_loss"):
        compute_influence(nn.Linear(3, 3), TensorDataset((x * 10).long(), y), num_queries=2, solver="exact")


class _Longer(Dataset):
    """``__len__`` says 30, the data hold 24."""

    def __init__(self, ds: TensorDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return 30

    def __getitem__(self, i):
        return self.ds.tensors[0][i], self.ds.tensors[1][i]


def test_a_dataset_longer_than_its_data_is_named_before_any_pass():
    with pytest.raises(InfluenceConfigError, match=r"the training dataset _Longer says it holds 30 examples "
                                                   r"\(__len__\), but example 29 cannot be read \(IndexError.*Make "
                                                   r"__len__ return"):
        compute_influence(nn.Linear(3, 3), _Longer(_classes()), num_queries=2, solver="exact")
