"""Magnitudes of the factored solvers against the Hessian solve, with and without calibration, on the zoo.

    python benchmarks/bench_calibration.py                      # every zoo family, 8 queries
    python benchmarks/bench_calibration.py transformer_tokens   # some of them

Per zoo entry (``tests/zoo.py``, float32 as trained, its loss): CG (``solver="cg"``) and EK-FAC uncalibrated
(``EKFACSettings(calibrate=False)``), with one scale (``calibrate="scalar"``), EK-FAC and K-FAC with the default
two-group scales, all with ``damping=AutoDamping(base=weight_decay)`` (each solver's own automatic rule, as a
user gets it). Printed per method: the damping it chose, the calibration scales ``α_K`` (``magnitude_scale``)
and ``α_D`` (``magnitude_scale_rest``, the parameters outside the Kronecker layers; 0 = excluded, – = none),
the per-query ratio of mean ``|score|`` to CG's (median [min-max] over queries: 1 = the Hessian solve's
magnitudes, i.e. believable predicted loss changes ``−score/n``), and the median [min] per-query Pearson
against CG (one scale leaves the ranking of the uncalibrated inverse; two scales change it).
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
    print("| model | CG λ | method | λ | α_K | α_D | mean \\|score\\| / CG's: median [min-max] | Pearson vs CG: median "
          "[min] |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        e = zoo.get(name)
        kw = dict(loss_fn=e.loss_fn, query_indices=list(range(8)), damping=AutoDamping(base=e.weight_decay))
        cg = compute_influence(e.model, e.train, e.query, solver="cg", **kw)
        for label, settings in (("ekfac, uncalibrated", EKFACSettings(calibrate=False)),
                                ("ekfac, one scale", EKFACSettings(calibrate="scalar")), ("ekfac", EKFACSettings()),
                                ("kfac", KFACSettings())):
            res = compute_influence(e.model, e.train, e.query, solver=settings, **kw)
            found = {d.name: d.value for d in res.setup_diagnostics()}
            alpha, rest = found.get("magnitude_scale", 1.0), found.get("magnitude_scale_rest")
            size = res.scores.abs().mean(1) / cg.scores.abs().mean(1)
            r = pearson(res.scores, cg.scores)
            print(f"| {name} | {cg.damping:.3g} | {label} | {res.damping:.3g} | {alpha:.3g} | "
                  f"{'–' if rest is None else format(rest, '.3g')} | {size.median():.2f} [{size.min():.2f}-"
                  f"{size.max():.2f}] | {r.median():.3f} [{r.min():.3f}] |", flush=True)


if __name__ == "__main__":
    main()
