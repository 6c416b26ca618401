"""Magnitudes of the factored solvers against the Hessian solve, with and without calibration, on the zoo.

    python benchmarks/bench_calibration.py                      # every zoo family, 8 queries
    python benchmarks/bench_calibration.py transformer_tokens   # some of them

Per zoo entry (``tests/zoo.py``, float32 as trained, its loss): CG (``solver="cg"``) and EK-FAC uncalibrated
(``EKFACSettings(calibrate=False)``), EK-FAC and K-FAC calibrated (the defaults), all with
``damping=AutoDamping(base=weight_decay)`` (each solver's own automatic rule, as a user gets it). Printed per
method: the damping it chose, the calibration scale ``α`` (``magnitude_scale``), the per-query ratio of mean
``|score|`` to CG's (median [min-max] over queries: 1 = the Hessian solve's magnitudes, i.e. believable
predicted loss changes ``−score/n``), and the median per-query Pearson against CG (the ranking; the scale
does not change it).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_influence import compute_influence  # noqa: E402
from lightning_influence.curvature.damping import AutoDamping  # noqa: E402
from lightning_influence.solvers.ekfac import EKFACSettings, KFACSettings  # noqa: E402
from tests import zoo  # noqa: E402


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(zoo.NAMES)
    print("| model | CG λ | method | λ | α | mean \\|score\\| / CG's: median [min-max] | Pearson vs CG |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        e = zoo.get(name)
        kw = dict(loss_fn=e.loss_fn, query_indices=list(range(8)), damping=AutoDamping(base=e.weight_decay))
        cg = compute_influence(e.model, e.train, e.query, solver="cg", **kw)
        for label, settings in (("ekfac, uncalibrated", EKFACSettings(calibrate=False)), ("ekfac", EKFACSettings()),
                                ("kfac", KFACSettings())):
            res = compute_influence(e.model, e.train, e.query, solver=settings, **kw)
            alpha = {d.name: d.value for d in res.setup_diagnostics()}.get("magnitude_scale", 1.0)
            size = res.scores.abs().mean(1) / cg.scores.abs().mean(1)
            print(f"| {name} | {cg.damping:.3g} | {label} | {res.damping:.3g} | {alpha:.3g} | {size.median():.2f} "
                  f"[{size.min():.2f}-{size.max():.2f}] | {pearson(res.scores, cg.scores).median():.3f} |", flush=True)


if __name__ == "__main__":
    main()
