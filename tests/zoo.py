"""A zoo of tiny, seeded, trained models, one per family users train, for running every solver on every family.

Entries (torch 2.13 CPU; build = data + training in CPU seconds on one thread of a shared 2-core machine, ±30 %;
fit = mean training loss, training / query accuracy; ``|∇|`` = norm of the regularised objective's gradient at
the returned weights, ``ratio`` = that over the RMS per-example gradient norm (64 training examples); ``λmin``,
``λmax`` = extreme eigenvalues of ``H = ∇²R`` (mean training loss, no L2), 60 Lanczos steps, float64):

=================== =================== ===== ======= ==== ======= ===== =================== ==== ===== ======= ====
name                family              param train/q wd   damping build fit                 |∇|  ratio λmin    λmax
=================== =================== ===== ======= ==== ======= ===== =================== ==== ===== ======= ====
logreg_digits       logistic_regression 650   300/50  0.01 0.01    0.05  0.386, 0.96 / 0.98  5e-5 4e-5  0.0000  0.94
mlp_tanh_digits     mlp                 1810  300/50  0.01 0.02    0.35  0.196, 0.99 / 0.92  1e-4 9e-5  -0.0097 2.1
cnn_bn_digits       cnn_batchnorm       1946  200/50  0.01 0.03    0.9   0.004, 1.00 / 0.90  1e-2 1e-2  -0.0143 43
resnet_block_digits resnet              1602  200/50  0.01 0.15    0.9   0.006, 1.00 / 0.96  6e-2 2e-2  -0.0712 96
transformer_tokens  transformer_encoder 2595  120/40  0.03 0.05    1.2   0.023, 1.00 / 0.925 4e-3 6e-4  -0.0299 197
lstm_tokens         lstm                3843  160/40  0.01 0.02    0.55  0.044, 1.00 / 0.975 1e-3 9e-4  -0.0101 15
gru_tokens_seqfirst gru                 2931  160/40  0.01 0.02    0.6   0.031, 1.00 / 1.00  8e-4 9e-4  -0.0106 8.7
rnn_tokens          rnn                 1082  200/40  0.01 0.02    0.3   0.008, 1.00 / 1.00  2e-5 3e-5  -0.0100 7.4
embedding_bag_text  embedding_bag       1668  300/50  0.01 0.02    0.1   0.240, 1.00 / 1.00  2e-5 4e-5  -0.0100 0.15
causal_lm_grammar   causal_lm           2648  150/40  0.03 0.15    1.1   5.68 (0.709/token)  3e-2 2e-3  -0.0922 84
regression_mlp      regression_mlp      1313  300/40  0.01 0.02    0.9   MSE 0.037 / q 0.053 2e-3 3e-4  -0.0096 100
=================== =================== ===== ======= ==== ======= ===== =================== ==== ===== ======= ====

The LM's token accuracy is 0.754 / 0.738 (the grammar allows 0.756; entropy rate 0.727 nats/token, query 0.852);
the regression targets have variance 1.54. Digits entries load sklearn's digits once per process (≈ 1.2 s, not
counted). All eleven build in ≈ 7-9 s. ``python -m tests.zoo [names]`` rebuilds and prints these numbers and
the autodiff probe below.

Minima and ``damping``. ``λmin ≥ −wd`` (``H + wd·I`` positive semi-definite) is what a local minimum of the
training objective needs. Three things show in the table:

* ``λmin = −wd`` to three digits (transformer, LSTM, GRU, RNN, EmbeddingBag): exact continuous symmetries of loss
  *and* L2 norm, so flat directions of the regularised objective (``H + wd·I`` singular) at a minimum:
  rotating the embedding space (an embedding followed by a linear map, as in every token model here), rotating
  each attention head's query/key (and value/output) space. Every example's gradient is orthogonal to them.
* ``λmin`` just above ``−wd`` (tanh MLPs): near-flat directions (units that weight decay has nearly switched off).
* ``λmin < −wd`` (CNN, ResNet, LM): not converged to a minimum; L-BFGS leaves ReLU networks in saddle regions
  (the LM's negative curvature is in its ReLU feed-forward block). More iterations help slowly.

So every entry carries ``damping ≥ weight_decay`` with ``λmin + damping ≥ 0.3·damping`` (measured): pass
``damping=e.damping`` where a solver needs ``H + λI`` positive definite; ``damping=e.weight_decay`` is the
Hessian of the training objective itself (fine for logreg; singular or indefinite for the others).

* ``logreg_digits``: ``nn.Linear(64, 10)``, L-BFGS. ``mlp_tanh_digits``: 64-24-10 tanh MLP, L-BFGS.
* ``cnn_bn_digits``: ``[B, 1, 8, 8]`` digits; two conv-BN-ReLU-maxpool stages and a linear head.
  ``resnet_block_digits``: stem conv-BN-ReLU, one residual block (conv-BN-ReLU-conv-BN + identity, ReLU),
  2×2 average pooling, linear head. Both: Adam in train mode, BN statistics set from the whole training set,
  L-BFGS in eval mode.
* ``transformer_tokens``: 8 tokens over a vocabulary of 12; the label is which of tokens 0/1/2 occurs most
  (ties redrawn). Embedding + positional parameter + ``nn.TransformerEncoder`` of one pre-norm
  ``nn.TransformerEncoderLayer(16, 4 heads, ff 32, batch_first=True, dropout=0)`` + mean pooling + head.
* ``lstm_tokens`` (``nn.LSTM``, batch-first) and ``gru_tokens_seqfirst`` (``nn.GRU(batch_first=False)``: the
  model transposes the batch-first tokens to ``[T, B, E]``): 10 tokens over 10; noise tokens 3..9 with 1-3
  signal tokens 0/1/2, the label is the *last* signal token. Head on the last hidden state.
  ``rnn_tokens`` (``nn.RNN``, tanh, batch-first): 8 tokens over 10, label: more 0s than 1s.
* ``embedding_bag_text``: bags of 12 words from a 100-word vocabulary, 4 topics (half of each bag's mass on
  its topic's 8 words); ``nn.EmbeddingBag(mode="mean")`` + linear head.
* ``causal_lm_grammar``: a small regular grammar over 8 tokens (each token has two successors, probabilities
  0.75 and 0.2, plus 0.05 spread uniformly), sequences of 9 from a uniform first token; inputs ``[:8]``, targets
  ``[1:]``. Embedding + positions, one causal pre-norm ``nn.TransformerEncoderLayer(16, 4 heads, ff 32)``
  (causal mask, ``is_causal=True``), final ``nn.LayerNorm``, LM head: logits ``[B, 8, 8]``. ``loss_fn`` =
  :func:`lm_sequence_loss` (sum of the token cross-entropies, ``[B]``); ``info["entropy_rate"]``. Its
  LayerNorms use ``eps=1.0``: with coupled L2 and the default ``1e-5`` the norms' scale invariance lets weight
  decay shrink the residual stream until only eps stops it (measured ``λmax`` 1.8e4, ``λmin`` −5.8, per-example
  gradients in the hundreds); ``causal_lm_grammar(layer_norm_eps=1e-5)`` builds that variant.
* ``regression_mlp``: ``y = sin(2 w₁·x) + ½ (w₂·x)² + 0.1 ε``, ``x ∈ R⁶``; 6-32-32-1 tanh MLP;
  ``loss_fn`` = :func:`mse_loss` (squared error per example, ``[B]``); targets ``[B, 1]``.

Autodiff coverage (:func:`autodiff_support`; torch 2.13 CPU; the zoo keeps the models as users write them):

* ``transformer_tokens``, ``causal_lm_grammar``: on CPU ``nn.MultiheadAttention`` runs the fused flash
  kernel, which has neither forward-mode AD (``jvp``) nor a double backward: every HVP fails. Per-example
  gradients work. ``model.math_attention = True`` switches the model to the math backend (HVPs work).
* ``lstm_tokens``: CPU float32 ``nn.LSTM`` runs oneDNN's ``mkldnn_rnn_layer``, which has no forward-mode AD
  (``jvp(grad)`` fails); double backward and ``vmap(grad)`` work. Under
  ``torch.backends.mkldnn.flags(enabled=False)`` ``jvp`` works but ``vmap(grad)`` fails as for the GRU.
* ``gru_tokens_seqfirst``, ``rnn_tokens``: ``vmap(grad)`` over single examples fails ("output with shape
  [1, 24] doesn't match the broadcast shape [4, 1, 24]", apparently the implicit zero initial state);
  HVPs work. Passing an initial state that depends on the input avoids it.
* ``embedding_bag_text``: ``nn.EmbeddingBag`` has no second derivative at all (no forward AD, no double
  backward): HVP solvers cannot run on it; per-example gradients work.
* every other entry: all three paths work.

Usage::

    from tests import zoo
    e = zoo.get("lstm_tokens")            # trained once per process (lru_cache), shared by tests
    e.model, e.train, e.query, e.loss_fn, e.weight_decay
    e64 = zoo.get("lstm_tokens", torch.float64)   # float64 copy of the same weights (or e.double())
    for name in zoo.NAMES: ...            # every entry; zoo.ZOO[name]() builds a fresh one (no cache)

Every entry is trained on ``mean_i loss_fn(model(x_i), y_i) + weight_decay/2 · ‖θ‖²`` (coupled L2: with the
package's ``R(θ) = (1/n) Σ L(z_i, θ)`` the training objective is ``R + wd/2‖θ‖²``, its Hessian ``H + wd·I``,
so ``damping=e.weight_decay`` inverts the Hessian of what was minimised; see ``damping`` above), full batch:
Adam first where L-BFGS alone is not enough, then L-BFGS (strong Wolfe). Keyword arguments of the builders
(``zoo.lstm_tokens(n_train=..., lbfgs_iter=..., wd=...)``) build variants; ``ZOO``/``get`` use the defaults.
Models with BatchNorm are trained in train mode, then their running statistics are set to the whole training
set's statistics and the polish runs in eval mode, so the model is near a stationary point *in eval mode* (the
mode influence is computed in). ``e.info`` records the final training and query loss, accuracy (classifiers;
token accuracy for the LM), the gradient norm of the regularised objective (``grad_norm``), the build's wall and
CPU seconds and the seed. Entries are shared: treat them as read-only (``copy.deepcopy(e.model)`` to change one).

Builds are deterministic: the same call gives bit-identical weights. They run on one intra-op thread (restored
afterwards; so the caller's thread count does not change the weights) and fork the global RNG
(``torch.random.fork_rng``), so building does not change the caller's random numbers.
Dataset inputs are batch-first (``[B, ...]``); token inputs are ``int64``. Plain ``torch.nn`` layers only.

Float64: ``e.double()`` (or ``e.to(dtype)``, ``get(name, torch.float64)``) deep-copies the model and casts it
and the floating-point dataset tensors; the weights are the float32 ones cast exactly, so the float64 copy sits
at the float32 solution (gradient norm as in ``e.info["grad_norm"]``, not float64's ~1e-12).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import TensorDataset

__all__ = ["ZooModel", "ZOO", "NAMES", "PARAM_RANGE", "get", "cache_clear", "lm_sequence_loss", "mse_loss",
           "stationarity", "hessian_extremes", "autodiff_support"]

#: the documented range of every entry's parameter count (inclusive)
PARAM_RANGE = (500, 15_000)

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ZooModel:
    """A trained model with its data.

    ``loss_fn(outputs, targets) -> Tensor[B]`` is the per-example loss, ``None`` for the default cross-entropy
    on ``[B, C]`` logits with integer labels (what the package uses when ``loss_fn=None``)."""

    name: str
    family: str
    model: nn.Module
    train: TensorDataset
    query: TensorDataset
    loss_fn: Optional[LossFn]
    weight_decay: float
    num_params: int
    damping: float  # ≥ weight_decay; H + damping·I is positive definite at these weights (see the table)
    task: str = "classification"  # "classification", "regression" or "language_model"
    info: Dict[str, Any] = field(default_factory=dict)

    def per_example_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``loss_fn`` or the default cross-entropy, ``[B]``."""
        if self.loss_fn is None:
            return F.cross_entropy(outputs, targets, reduction="none")
        return self.loss_fn(outputs, targets)

    def to(self, dtype: torch.dtype) -> "ZooModel":
        """A copy in ``dtype``: the model deep-copied and cast, floating-point dataset tensors cast."""
        if dtype == next(self.model.parameters()).dtype:
            return self
        model = copy.deepcopy(self.model).to(dtype).eval()
        return replace(self, model=model, train=_cast_dataset(self.train, dtype),
                       query=_cast_dataset(self.query, dtype), info=dict(self.info, dtype=str(dtype)))

    def double(self) -> "ZooModel":
        return self.to(torch.float64)


def _cast_dataset(ds: TensorDataset, dtype: torch.dtype) -> TensorDataset:
    return TensorDataset(*[t.to(dtype) if t.is_floating_point() else t for t in ds.tensors])


def lm_sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sequence language-model loss: the sum over positions of the token cross-entropies.
    ``logits [B, T, V]``, ``targets [B, T]`` (int64) → ``[B]``."""
    b, t, v = logits.shape
    return F.cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t), reduction="none").view(b, t).sum(1)


def mse_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example squared error summed over output dimensions, ``[B]``."""
    return ((outputs - targets) ** 2).reshape(len(outputs), -1).sum(1)


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread():
    """Run on one intra-op thread (restored afterwards): the zoo's tiny ops gain nothing from more, and with
    two threads on two busy cores every op waits for the other (a test run took 15× longer). Builds are then
    bit-identical whatever thread count the caller uses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _objective(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Optional[LossFn], wd: float) -> Tensor:
    out = model(x)
    per = F.cross_entropy(out, y, reduction="none") if loss_fn is None else loss_fn(out, y)
    return per.mean() + 0.5 * wd * sum((p * p).sum() for p in model.parameters())


def _adam(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Optional[LossFn], wd: float, steps: int,
          lr: float) -> None:
    """Full-batch Adam with coupled L2 (in the loss, so the minimum is that of the regularised objective)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _objective(model, x, y, loss_fn, wd).backward()
        opt.step()


def _lbfgs(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Optional[LossFn], wd: float, max_iter: int) -> None:
    """Full-batch L-BFGS with a strong-Wolfe line search for ``max_iter`` iterations (its tolerances lie below
    float32's resolution: it stops early only when a step makes no progress)."""
    opt = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _objective(model, x, y, loss_fn, wd)
        loss.backward()
        return loss

    opt.step(closure)


def _grad_norm(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Optional[LossFn], wd: float) -> float:
    params = list(model.parameters())
    g = torch.autograd.grad(_objective(model, x, y, loss_fn, wd), params)
    return float(torch.sqrt(sum((gi.double() ** 2).sum() for gi in g)))


def _set_bn_statistics(model: nn.Module, x: Tensor) -> None:
    """Running statistics of every BatchNorm = the statistics of the whole training set (one full-batch pass
    with a cumulative average), so eval mode normalises as the last full-batch train-mode step did."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def _summarise(model: nn.Module, train: TensorDataset, query: TensorDataset, loss_fn: Optional[LossFn],
               wd: float, task: str) -> Dict[str, Any]:
    x, y = train.tensors
    xq, yq = query.tensors
    info: Dict[str, Any] = {}
    with torch.no_grad():
        out, outq = model(x), model(xq)
        per = F.cross_entropy(out, y, reduction="none") if loss_fn is None else loss_fn(out, y)
        perq = F.cross_entropy(outq, yq, reduction="none") if loss_fn is None else loss_fn(outq, yq)
        info["train_loss"] = float(per.mean())
        info["query_loss"] = float(perq.mean())
        if task == "classification":
            info["train_acc"] = float((out.argmax(-1) == y).float().mean())
            info["query_acc"] = float((outq.argmax(-1) == yq).float().mean())
            info["chance_acc"] = 1.0 / out.shape[-1]
        elif task == "language_model":
            info["train_token_acc"] = float((out.argmax(-1) == y).float().mean())
            info["query_token_acc"] = float((outq.argmax(-1) == yq).float().mean())
            info["chance_token_acc"] = 1.0 / out.shape[-1]
            info["train_token_loss"] = info["train_loss"] / y.shape[1]
        else:
            info["target_var"] = float(y.var())
    info["grad_norm"] = _grad_norm(model, x, y, loss_fn, wd)
    return info


def _entry(builder: Callable[[torch.Generator], Tuple[Any, ...]], *, name: str,
           family: str, seed: int, wd: float, loss_fn: Optional[LossFn] = None, task: str = "classification",
           adam_steps: int = 0, adam_lr: float = 1e-2, lbfgs_iter: int = 200, batchnorm: bool = False,
           damping: Optional[float] = None) -> ZooModel:
    """Seed, generate data and model (``builder(generator) -> (model, train, query[, extra info])``, model init
    from the seeded global RNG), train (Adam then L-BFGS, see the module docstring) and wrap. The caller's RNG
    state is restored."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        built = builder(gen)
        model, train, query = built[:3]
        extra = built[3] if len(built) > 3 else {}
        x, y = train.tensors
        model.train()
        if adam_steps:
            _adam(model, x, y, loss_fn, wd, adam_steps, adam_lr)
        if batchnorm:
            _set_bn_statistics(model, x)
        else:
            model.eval()  # no dropout / BN anywhere else, but polish in the mode influence is computed in
        if lbfgs_iter:
            _lbfgs(model, x, y, loss_fn, wd, lbfgs_iter)
        model.eval()
        for p in model.parameters():
            p.grad = None
        info = _summarise(model, train, query, loss_fn, wd, task)
    info.update(extra)
    info.update(seed=seed, build_s=time.perf_counter() - t0, build_cpu_s=time.process_time() - c0,
                dtype=str(torch.float32), adam_steps=adam_steps, lbfgs_iter=lbfgs_iter)
    num_params = sum(p.numel() for p in model.parameters())
    return ZooModel(name=name, family=family, model=model, train=train, query=query, loss_fn=loss_fn,
                    weight_decay=wd, num_params=num_params, damping=wd if damping is None else damping, task=task,
                    info=info)


def _train(build: Callable[[torch.Generator], Tuple[Any, ...]], overrides: Dict[str, Any], **defaults: Any) -> ZooModel:
    """``_entry`` with an entry's defaults updated by the caller's keyword arguments."""
    return _entry(build, **{**defaults, **overrides})


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _digits_all() -> Tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def _digits(gen: torch.Generator, n_train: int, n_query: int,
            image: bool = False) -> Tuple[TensorDataset, TensorDataset]:
    """A seeded random split of sklearn digits (pixels in [0, 1]); ``image=True`` gives ``[B, 1, 8, 8]``."""
    x, y = _digits_all()
    perm = torch.randperm(len(x), generator=gen)
    x, y = x[perm], y[perm]
    if image:
        x = x.view(-1, 1, 8, 8)
    tr, q = slice(0, n_train), slice(n_train, n_train + n_query)
    return TensorDataset(x[tr].clone(), y[tr].clone()), TensorDataset(x[q].clone(), y[q].clone())


def _split(x: Tensor, y: Tensor, n_train: int) -> Tuple[TensorDataset, TensorDataset]:
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def _majority_tokens(gen: torch.Generator, n: int, seq_len: int, vocab: int, n_classes: int) -> Tuple[Tensor, Tensor]:
    """Uniform tokens; the label is which of the tokens ``0..n_classes-1`` occurs most often (sequences
    with a tie are redrawn)."""
    xs, ys, have = [], [], 0
    while have < n:
        x = torch.randint(0, vocab, (2 * n, seq_len), generator=gen)
        counts = torch.stack([(x == c).sum(1) for c in range(n_classes)], 1)
        top2 = counts.topk(2, dim=1).values
        keep = top2[:, 0] > top2[:, 1]
        xs.append(x[keep])
        ys.append(counts[keep].argmax(1))
        have += int(keep.sum())
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _last_signal_tokens(gen: torch.Generator, n: int, seq_len: int, vocab: int,
                        n_classes: int) -> Tuple[Tensor, Tensor]:
    """Noise tokens ``n_classes..vocab-1`` with 1-3 signal tokens ``0..n_classes-1`` at random positions; the
    label is the *last* signal token (order matters)."""
    x = torch.randint(n_classes, vocab, (n, seq_len), generator=gen)
    y = torch.empty(n, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        pos = torch.randperm(seq_len, generator=gen)[:k].sort().values
        sig = torch.randint(0, n_classes, (k,), generator=gen)
        x[i, pos] = sig
        y[i] = sig[-1]
    return x, y


def _topic_bags(gen: torch.Generator, n: int, bag: int, vocab: int, n_classes: int) -> Tuple[Tensor, Tensor]:
    """Bags of ``bag`` tokens from a class's topic: half the mass on its own 8 topic words, the rest uniform
    over the vocabulary (words shared between topics)."""
    topics = torch.randperm(vocab, generator=gen)[: 8 * n_classes].view(n_classes, 8)
    probs = torch.full((n_classes, vocab), 0.5 / vocab)
    for c in range(n_classes):
        probs[c, topics[c]] += 0.5 / 8
    y = torch.randint(0, n_classes, (n,), generator=gen)
    x = torch.multinomial(probs[y], bag, replacement=True, generator=gen)
    return x, y


def _markov_transitions(gen: torch.Generator, vocab: int, probs: Tuple[float, ...] = (0.75, 0.2)) -> Tensor:
    """A small regular grammar: every token has ``len(probs)`` distinct successors (a random choice) taking
    those probabilities; the remaining mass is spread uniformly over the vocabulary. ``[V, V]`` row-stochastic."""
    trans = torch.full((vocab, vocab), (1.0 - sum(probs)) / vocab)
    for i in range(vocab):
        succ = torch.randperm(vocab, generator=gen)[: len(probs)]
        trans[i, succ] += torch.tensor(probs)
    return trans


def _markov_sequences(gen: torch.Generator, trans: Tensor, n: int, length: int) -> Tensor:
    """``n`` sequences of the Markov chain ``trans`` from a uniform first token."""
    seqs = torch.empty(n, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, trans.shape[0], (n,), generator=gen)
    for t in range(1, length):
        seqs[:, t] = torch.multinomial(trans[seqs[:, t - 1]], 1, generator=gen).squeeze(1)
    return seqs


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------


def _attention_backend(math: bool) -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention``'s math backend (``math=True``) or torch's choice. On CPU torch picks
    the fused flash kernel, whose backward has no derivative: second-order autograd (HVPs, ``torch.func``
    ``jvp``-of-``grad``) through ``nn.MultiheadAttention`` then fails with "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". The math backend is the
    same computation in differentiable ops. The zoo's transformers use torch's choice (what users get);
    set ``model.math_attention = True`` for the math backend."""
    return sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()


class ResBlockNet(nn.Module):
    """Stem conv-BN-ReLU, one residual block (conv-BN-ReLU-conv-BN + identity skip, ReLU), 2×2 average
    pooling and a linear head."""

    def __init__(self, channels: int = 12, n_classes: int = 10) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(4 * c, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        r = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))
        h = F.relu(h + r)
        return self.head(self.pool(h).flatten(1))


class TransformerClassifier(nn.Module):
    """Token embedding + learned positional parameter, ``nn.TransformerEncoder`` (batch-first, no dropout),
    mean pooling over positions, linear head."""

    def __init__(self, vocab: int, seq_len: int, n_classes: int, d_model: int = 24, nhead: int = 4,
                 ff: int = 48, layers: int = 1, norm_first: bool = True, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True, norm_first=norm_first,
                                           layer_norm_eps=layer_norm_eps)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)
        self.math_attention = False

    def forward(self, tokens: Tensor) -> Tensor:
        with _attention_backend(self.math_attention):
            h = self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]])
        return self.head(h.mean(1))


class RecurrentClassifier(nn.Module):
    """Embedding, an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` and a linear head on the last hidden state.
    ``batch_first=False`` transposes the batch-first tokens to sequence-first inside the model."""

    def __init__(self, cell: str, vocab: int, n_classes: int, embed: int = 12, hidden: int = 24,
                 batch_first: bool = True) -> None:
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = rnn_cls(embed, hidden, batch_first=batch_first)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        e = self.embed(tokens)  # [B, T, E]
        if not self.batch_first:
            e = e.transpose(0, 1)  # [T, B, E]
        out, _ = self.rnn(e)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


class BagClassifier(nn.Module):
    """``nn.EmbeddingBag`` (mean of the bag's word vectors; ``[B, bag]`` token input) and a linear head."""

    def __init__(self, vocab: int, n_classes: int, dim: int = 16) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.head = nn.Linear(dim, n_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.bag(tokens))


class CausalLM(nn.Module):
    """Token embedding + learned positions, one ``nn.TransformerEncoderLayer`` with a causal mask
    (pre-norm, no dropout), final LayerNorm and an LM head: ``[B, T]`` tokens → ``[B, T, V]`` logits."""

    def __init__(self, vocab: int, seq_len: int, d_model: int = 24, nhead: int = 4, ff: int = 48,
                 layer_norm_eps: float = 1e-5, norm_first: bool = True, final_norm: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(seq_len, d_model))
        self.block = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True,
                                                norm_first=norm_first, layer_norm_eps=layer_norm_eps)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps) if final_norm else nn.Identity()
        self.lm_head = nn.Linear(d_model, vocab)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)
        self.math_attention = False

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        with _attention_backend(self.math_attention):
            h = self.block(h, src_mask=self.causal_mask[:t, :t], is_causal=True)
        return self.lm_head(self.norm(h))


# --------------------------------------------------------------------------------------------------------------
# entries
# --------------------------------------------------------------------------------------------------------------


def logreg_digits(n_train: int = 300, n_query: int = 50, **train: Any) -> ZooModel:
    def build(gen):
        tr, q = _digits(gen, n_train, n_query)
        return nn.Linear(64, 10), tr, q

    return _train(build, train, name="logreg_digits", family="logistic_regression", seed=0, wd=1e-2, lbfgs_iter=300)


def mlp_tanh_digits(n_train: int = 300, n_query: int = 50, **train: Any) -> ZooModel:
    def build(gen):
        tr, q = _digits(gen, n_train, n_query)
        return nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)), tr, q

    return _train(build, train, name="mlp_tanh_digits", family="mlp", seed=1, wd=1e-2, damping=0.02, lbfgs_iter=300)


def cnn_bn_digits(n_train: int = 200, n_query: int = 50, **train: Any) -> ZooModel:
    def build(gen):
        tr, q = _digits(gen, n_train, n_query, image=True)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),    # 8×4×4
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 16×2×2
            nn.Flatten(), nn.Linear(64, 10),
        )
        return model, tr, q

    return _train(build, train, name="cnn_bn_digits", family="cnn_batchnorm", seed=2, wd=1e-2, damping=0.03,
                  adam_steps=60, adam_lr=2e-2, lbfgs_iter=200, batchnorm=True)


def resnet_block_digits(n_train: int = 200, n_query: int = 50, channels: int = 8, **train: Any) -> ZooModel:
    def build(gen):
        tr, q = _digits(gen, n_train, n_query, image=True)
        return ResBlockNet(channels=channels), tr, q

    return _train(build, train, name="resnet_block_digits", family="resnet", seed=3, wd=1e-2, damping=0.15,
                  adam_steps=60, adam_lr=2e-2, lbfgs_iter=100, batchnorm=True)


def transformer_tokens(n_train: int = 120, n_query: int = 40, **train: Any) -> ZooModel:
    vocab, seq_len, n_classes = 12, 8, 3

    def build(gen):
        x, y = _majority_tokens(gen, n_train + n_query, seq_len, vocab, n_classes)
        tr, q = _split(x, y, n_train)
        return TransformerClassifier(vocab, seq_len, n_classes, d_model=16, ff=32, layers=1), tr, q

    return _train(build, train, name="transformer_tokens", family="transformer_encoder", seed=4, wd=3e-2,
                  damping=0.05, adam_steps=60, adam_lr=1e-2, lbfgs_iter=200)


def lstm_tokens(n_train: int = 160, n_query: int = 40, **train: Any) -> ZooModel:
    vocab, seq_len, n_classes = 10, 10, 3

    def build(gen):
        x, y = _last_signal_tokens(gen, n_train + n_query, seq_len, vocab, n_classes)
        tr, q = _split(x, y, n_train)
        return RecurrentClassifier("lstm", vocab, n_classes, batch_first=True), tr, q

    return _train(build, train, name="lstm_tokens", family="lstm", seed=5, wd=1e-2, damping=0.02, adam_steps=60,
                  adam_lr=2e-2, lbfgs_iter=120)


def gru_tokens_seqfirst(n_train: int = 160, n_query: int = 40, **train: Any) -> ZooModel:
    vocab, seq_len, n_classes = 10, 10, 3

    def build(gen):
        x, y = _last_signal_tokens(gen, n_train + n_query, seq_len, vocab, n_classes)
        tr, q = _split(x, y, n_train)
        return RecurrentClassifier("gru", vocab, n_classes, batch_first=False), tr, q

    return _train(build, train, name="gru_tokens_seqfirst", family="gru", seed=6, wd=1e-2, damping=0.02,
                  adam_steps=60, adam_lr=2e-2, lbfgs_iter=120)


def rnn_tokens(n_train: int = 200, n_query: int = 40, **train: Any) -> ZooModel:
    vocab, seq_len, n_classes = 10, 8, 2

    def build(gen):
        x, y = _majority_tokens(gen, n_train + n_query, seq_len, vocab, n_classes)
        tr, q = _split(x, y, n_train)
        return RecurrentClassifier("rnn", vocab, n_classes, embed=12, hidden=24, batch_first=True), tr, q

    return _train(build, train, name="rnn_tokens", family="rnn", seed=7, wd=1e-2, damping=0.02, adam_steps=100,
                  adam_lr=1e-2, lbfgs_iter=200)


def embedding_bag_text(n_train: int = 300, n_query: int = 50, **train: Any) -> ZooModel:
    vocab, bag, n_classes = 100, 12, 4

    def build(gen):
        x, y = _topic_bags(gen, n_train + n_query, bag, vocab, n_classes)
        tr, q = _split(x, y, n_train)
        return BagClassifier(vocab, n_classes, dim=16), tr, q

    return _train(build, train, name="embedding_bag_text", family="embedding_bag", seed=8, wd=1e-2, damping=0.02,
                  adam_steps=100, adam_lr=5e-2, lbfgs_iter=200)


def causal_lm_grammar(n_train: int = 150, n_query: int = 40, layer_norm_eps: float = 1.0,
                      model_kw: Optional[Dict[str, Any]] = None, **train: Any) -> ZooModel:
    vocab, length = 8, 9  # sequences of 9 tokens: inputs [:8], next-token targets [1:]

    def build(gen):
        trans = _markov_transitions(gen, vocab)
        seqs = _markov_sequences(gen, trans, n_train + n_query, length)
        x, y = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
        tr, q = _split(x, y, n_train)
        row = trans[0]  # every row holds the same probabilities: the entropy rate is one row's entropy
        extra = {"entropy_rate": float(-(row * row.log()).sum())}
        model = CausalLM(vocab, length - 1, d_model=16, ff=32, layer_norm_eps=layer_norm_eps, **(model_kw or {}))
        return model, tr, q, extra

    return _train(build, train, name="causal_lm_grammar", family="causal_lm", seed=9, wd=3e-2, damping=0.15,
                  loss_fn=lm_sequence_loss, task="language_model", adam_steps=60, adam_lr=1e-2, lbfgs_iter=150)


def regression_mlp(n_train: int = 300, n_query: int = 40, **train: Any) -> ZooModel:
    def build(gen):
        n, d = n_train + n_query, 6
        x = torch.randn(n, d, generator=gen)
        w = torch.randn(2, d, generator=gen) / math.sqrt(d)
        y = torch.sin(2 * x @ w[0]) + 0.5 * (x @ w[1]) ** 2 + 0.1 * torch.randn(n, generator=gen)
        tr, q = _split(x, y.unsqueeze(1), n_train)
        model = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        return model, tr, q

    return _train(build, train, name="regression_mlp", family="regression_mlp", seed=10, wd=1e-2, damping=0.02,
                  loss_fn=mse_loss, task="regression", adam_steps=100, adam_lr=1e-2, lbfgs_iter=700)


#: name → builder of a fresh trained entry (no cache; ``get`` caches)
ZOO: Dict[str, Callable[[], ZooModel]] = {
    f.__name__: f
    for f in (logreg_digits, mlp_tanh_digits, cnn_bn_digits, resnet_block_digits, transformer_tokens, lstm_tokens,
              gru_tokens_seqfirst, rnn_tokens, embedding_bag_text, causal_lm_grammar, regression_mlp)
}
NAMES = tuple(ZOO)


@functools.lru_cache(maxsize=None)
def _get32(name: str) -> ZooModel:
    return ZOO[name]()


@functools.lru_cache(maxsize=None)
def get(name: str, dtype: torch.dtype = torch.float32) -> ZooModel:
    """The trained entry ``name``, built once per process and shared (treat it as read-only); ``dtype`` other
    than float32 gives a cast copy of the float32 weights (also cached)."""
    if name not in ZOO:
        raise KeyError(f"no zoo entry {name!r}; entries: {', '.join(NAMES)}")
    return _get32(name).to(dtype)


@_one_thread()
def stationarity(entry: ZooModel, n: int = 64) -> Dict[str, float]:
    """How near the training point is to a stationary point: ``|∇(R + wd/2‖θ‖²)|``, the RMS of the first
    ``n`` per-example gradients ``|∇L_i|`` (plain loop, no vmap) and their ratio."""
    model = entry.model
    x, y = entry.train.tensors
    params = [p for p in model.parameters() if p.requires_grad]
    full = _grad_norm(model, x, y, entry.loss_fn, entry.weight_decay)
    sq = []
    for i in range(min(n, len(x))):
        loss = entry.per_example_loss(model(x[i : i + 1]), y[i : i + 1]).sum()
        g = torch.autograd.grad(loss, params)
        sq.append(float(sum((gi.double() ** 2).sum() for gi in g)))
    rms = math.sqrt(sum(sq) / len(sq))
    return {"grad_norm": full, "example_grad_rms": rms, "ratio": full / rms}


@_one_thread()
def hessian_extremes(entry: ZooModel, steps: int = 60, seed: int = 0, eps: float = 1e-4) -> Tuple[float, float]:
    """``(λmin, λmax)`` of ``H = ∇²R(θ)`` (mean training loss, no L2 term) by Lanczos with full
    reorthogonalisation, on a float64 copy. Hessian-vector products by double backward (the transformers'
    attention switched to the math backend), or where torch has no second derivative (``nn.EmbeddingBag``)
    by central differences of gradients (not for ReLU networks, whose gradient jumps at the kinks). At a
    minimum of the training objective ``H + weight_decay·I`` is positive semi-definite: ``λmin ≥ -wd``."""
    e = entry.to(torch.float64)
    if e is entry:
        e = replace(entry, model=copy.deepcopy(entry.model))
    model = e.model
    if hasattr(model, "math_attention"):
        model.math_attention = True
    x, y = e.train.tensors
    params = [p for p in model.parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def flat_grad(create_graph: bool = False) -> Tensor:
        g = torch.autograd.grad(e.per_example_loss(model(x), y).mean(), params, create_graph=create_graph)
        return torch.cat([gi.reshape(-1) for gi in g])

    def fd_hvp(v: Tensor) -> Tensor:
        h = eps / max(float(v.norm()), 1e-30)
        out = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(theta + sign * h * v, params)
            out.append(flat_grad())
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, params)
        return (out[0] - out[1]) / (2 * h)

    try:
        g = flat_grad(create_graph=True)
        torch.autograd.grad(g @ torch.ones_like(g), params, retain_graph=True)

        def hvp(v: Tensor) -> Tensor:
            hv = torch.autograd.grad(g @ v, params, retain_graph=True)
            return torch.cat([t.reshape(-1) for t in hv])
    except (RuntimeError, NotImplementedError):
        hvp = fd_hvp

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(theta.numel(), generator=gen, dtype=torch.float64)
    qs, alphas, betas = [q / q.norm()], [], []
    for k in range(min(steps, theta.numel())):
        w = hvp(qs[-1]).detach()
        alphas.append(float(w @ qs[-1]))
        basis = torch.stack(qs)
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)  # twice: full reorthogonalisation
        b = float(w.norm())
        if b < 1e-10 or k == steps - 1:
            break
        betas.append(b)
        qs.append(w / b)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t)
    return float(ritz[0]), float(ritz[-1])


@_one_thread()
def autodiff_support(entry: ZooModel, n: int = 4) -> Dict[str, str]:
    """Which of the autodiff paths influence code uses work through this model (``"ok"`` or the error, first
    line): per-example gradients ``vmap(grad)`` over single examples, HVPs as forward-over-reverse
    ``vmap(jvp(grad))`` (``torch.func``) and as reverse-over-reverse (autograd double backward). A probe of
    torch's operator coverage, not a property the zoo promises (it changes with torch versions)."""
    from torch.func import functional_call, grad, jvp, vmap

    model = entry.model
    x, y = entry.train.tensors
    x, y = x[:n], y[:n]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: Dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return entry.per_example_loss(functional_call(model, p, (xb,)), yb).mean()

    def per_example() -> None:
        vmap(lambda xi, yi: grad(loss)(params, xi[None], yi[None]))(x, y)

    def forward_over_reverse() -> None:
        vs = {k: torch.ones((2, *v.shape), dtype=v.dtype) for k, v in params.items()}
        vmap(lambda v: jvp(lambda p: grad(loss)(p, x, y), (params,), (v,))[1])(vs)

    def double_backward() -> None:
        ps = list(model.parameters())
        g = torch.autograd.grad(entry.per_example_loss(model(x), y).mean(), ps, create_graph=True)
        torch.autograd.grad(g, ps, [torch.ones_like(p) for p in ps])

    out = {}
    probes = (("vmap_grad", per_example), ("jvp_grad", forward_over_reverse), ("double_backward", double_backward))
    for key, fn in probes:
        try:
            fn()
            out[key] = "ok"
        except (RuntimeError, NotImplementedError) as err:
            out[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
    return out


def cache_clear() -> None:
    """Forget the cached entries (the next ``get`` builds afresh)."""
    get.cache_clear()
    _get32.cache_clear()


if __name__ == "__main__":  # python -m tests.zoo [names]: build entries and print the docstring's numbers
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    for n in sys.argv[1:] or NAMES:
        e = ZOO[n]()
        i = e.info
        fit = {k: round(v, 4) for k, v in i.items() if k.endswith(("loss", "acc")) or k == "target_var"}
        st = stationarity(e)
        lo, hi = hessian_extremes(e)
        print(f"{n:22s} {e.family:20s} P={e.num_params:6d} train={len(e.train)} query={len(e.query)} "
              f"wd={e.weight_decay:g} damping={e.damping:g} build={i['build_s']:.2f}s cpu={i['build_cpu_s']:.2f}s "
              f"|g|={i['grad_norm']:.1e} rms|g_i|={st['example_grad_rms']:.1e} ratio={st['ratio']:.1e} "
              f"lam_min={lo:+.4f} lam_max={hi:.3g} {fit}", flush=True)
        print("    autodiff:", autodiff_support(e), flush=True)
