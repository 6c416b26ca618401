"""Which parameter blocks cost EK-FAC's correlation on bench_transformers.py's models (one process, no peers).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_transformers_blocks.py classifier   # after bench_transformers.py --size small

Loads the model and the CG reference that ``bench_transformers.py --size small`` cached in ``benchmarks/.cache/``
and runs our EK-FAC (calibrated and not) at the reference's λ, attributing to kronfluence's tracked layers (the
feed-forward Linear layers and the head) plus one more block at a time: the attention (its packed in-projection
factored by the MultiheadAttention adapter, ``out_proj`` by the Linear one), the embedding (Embedding adapter), the
positions (diagonal), the LayerNorms (diagonal), and all parameters. Prints median/min Pearson against the
reference (all parameters), the |score| ratio and the seconds of each call.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_transformers as bt  # noqa: E402
from lightning_influence import EKFACSettings, compute_influence  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    name = sys.argv[1] if len(sys.argv) > 1 else "classifier"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    model, train, query, b = bt.load(os.path.join(bt.CACHE, f"transformers_{name}_{size}.pt"))
    ref = torch.load(os.path.join(bt.CACHE, f"transformers_ref_{name}_{size}_float32_1e-06.pt"), weights_only=False)
    lam, reference = ref["info"]["damping"], ref["scores"]
    tracked = bt.kronfluence_tracked(model)
    attn = [n for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    norms = [n for n, _ in model.named_parameters() if "norm" in n]
    sets = {"tracked (kronfluence's)": tracked, "+ attention": tracked + attn, "+ embedding": tracked + ["embed"],
            "+ pos": tracked + ["pos"], "+ LayerNorms": tracked + norms, "all": None}
    loss_fn = None if name == "classifier" else bt.lm_sequence_loss
    print("| model | attributed | calibrate | median r | min r | \\|s\\| ratio | s |\n|---|---|---|---|---|---|---|")
    for label, params in sets.items():
        for cal in (True, False):
            t0 = time.perf_counter()
            res = compute_influence(model, train, query, query_indices=list(range(reference.shape[0])),
                                    loss_fn=loss_fn, solver=EKFACSettings(calibrate=cal), damping=lam, params=params)
            c = bt.correlations(res.scores, reference)
            print(f"| {name} | {label} | {cal} | {c['r_med']:.4f} | {c['r_min']:.4f} | {c['ratio']:.3g} | "
                  f"{time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
