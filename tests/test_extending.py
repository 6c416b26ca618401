"""The README's "How to add" snippets (a solver, an EK-FAC layer type, a reporter, a schedule), run as written
and checked against exact answers, so that the development section stays true."""

from __future__ import annotations

import os
import re
from typing import Any, Dict

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceCallback, RunKey, compute_influence
from lightning_influence.solvers import base as solver_base
from lightning_influence.solvers import solver_names
from lightning_influence.solvers.kronecker import adapters

from .lit_models import LitClassifier, loaders, quiet_trainer
from .problems import digits

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _snippets() -> str:
    """Every ```python block of the README's "How to add" part, in order, as one program."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index("How to add each of the four things")
    end = text.find("\n## ", start)
    part = text[start:] if end < 0 else text[start:end]
    blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    assert len(blocks) == 4, "the README's development section lost one of its four snippets"
    return "\n".join(blocks)


@pytest.fixture(scope="module")
def snippets():
    """The snippets' namespace; what they registered is unregistered afterwards."""
    namespace: Dict[str, Any] = {"__name__": "readme_snippets"}
    exec(compile(_snippets(), README, "exec"), namespace)  # noqa: S102 - our own README
    yield namespace
    solver_base._REGISTRY.pop("identity", None)
    adapters._ADAPTERS.pop(namespace["Dense"], None)


def _tiny(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    return TensorDataset(x, y)


def _grads(model: nn.Module, data: TensorDataset) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, *data.tensors)
    return torch.cat([g[k].reshape(len(data), -1) for k in params], dim=1)


def test_a_solver_is_one_registered_class(snippets):
    assert "identity" in solver_names()
    torch.manual_seed(0)
    model, data = nn.Linear(4, 3).double(), _tiny()
    res = compute_influence(model, data, query_indices=[0, 5], solver="identity", damping=0.5, self_influence=True,
                            dtype=torch.float64)
    g = _grads(model, data)
    assert torch.allclose(res.scores, -(g[[0, 5]] @ g.T) / 1.5, rtol=1e-10, atol=1e-12)
    assert torch.allclose(res.self_influence, -(g * g).sum(1) / 1.5, rtol=1e-10, atol=1e-12)
    assert res.settings["solver"] == "identity" and res.settings["kind"] == "factored"
    auto = compute_influence(model, data, query_indices=[0], solver="identity", dtype=torch.float64)
    assert auto.damping == pytest.approx(0.1)  # the factored rule: max(base 0, 0.1 × mean eigenvalue 1)


def test_a_layer_type_is_one_adapter_class(snippets):
    """EK-FAC on the user's ``Dense`` equals EK-FAC on ``nn.Linear`` with the same weights, fully factored."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    dense = snippets["Dense"](4, 3).double()
    with torch.no_grad():
        dense.weight.copy_(lin.weight)
        dense.bias.copy_(lin.bias)
    data = _tiny(1)
    kw: Dict[str, Any] = dict(query_indices=[0, 1, 2], solver="ekfac", damping=0.05, dtype=torch.float64)
    ref, mine = compute_influence(lin, data, **kw), compute_influence(dense, data, **kw)
    assert torch.allclose(mine.scores, ref.scores, rtol=1e-9, atol=1e-12)
    setup = {d.name: d.value for d in mine.setup_diagnostics()}
    assert setup["kronecker_coverage"] == 1.0 and setup["kronecker_layers"] == "(model)"


def test_a_reporter_and_a_schedule_are_one_class_each(snippets, tmp_path):
    train, val = digits(torch.float32, n_train=150)
    cb = InfluenceCallback(num_queries=2, solver="exact", params=["net.bias"], on_error="raise", save_results=False,
                           reporters=[snippets["MostHarmful"]()], schedule=snippets["AtEpochs"](0))
    assert cb.schedule.describe() == "after epochs [0], and when training ends"
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(LitClassifier(), *loaders(train, val))
    assert [k.label for k in cb.history] == ["epoch 0", "end of training"]
    final = cb.results
    assert final is cb.history[RunKey("final", 1, final.record.key.global_step)]
    worst = [int(final.scores[q].argmax()) for q in range(final.scores.shape[0])]  # the most harmful: largest score
    assert cb.outputs["most_harmful"] == worst and cb.outputs["html_path"] is None  # only the reporter asked for
    assert len(snippets["reporters"]) == 4  # the defaults (scalars, HTML, W&B) and the new one
