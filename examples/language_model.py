"""Which training text drove each token of a language model's completion: per-token influence with the callback.

A tiny character-level causal transformer (embedding + learned positions, causal ``nn.TransformerEncoderLayer``
blocks, LM head) is trained by a ``Trainer`` on the docstrings of standard-library modules (``json``,
``textwrap``, ``collections``, …: text that ships with Python, nothing downloaded), cut into fixed-length
windows. After training, the model completes a few prompts greedily; each prompt + completion becomes a query
whose targets are the completion's characters only (the prompt's are ``-100``, so they carry no loss).

``InfluenceCallback(solver="ekfac", per_token=True, decode=...)`` then scores every training window for every
query and for every completion token (``results.token_scores``: ``−∇L_t(z_q)ᵀ(H + λI)⁻¹∇L(z_i)``, summing over
the tokens to the sequence score), in one pass over the training set. The script prints, per completion, its
top harmful and helpful training windows (positive = harmful: removing it would lower the completion's loss)
and, per completion character, the training window that raised its probability most (the most helpful one);
the HTML report (a token heat map per query, text decoded) and the offline W&B run (``influence/token_influence``)
are written into ``--out``.

    python examples/language_model.py            # about a minute on 2 shared CPU cores
    python examples/language_model.py --quick    # seconds: a smoke test
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import _common as C

MODULES = ("json", "textwrap", "collections", "functools", "string", "csv", "argparse", "pathlib")
QUICK_MODULES = ("json", "textwrap")
PROMPTS = ("Return a ", "If the ", "The default ")
IGNORE = -100


# ---------------------------------------------------------------------------------------------- text
def docstrings(names: Sequence[str]) -> str:
    """The docstrings of the modules ``names`` and of their public classes and functions, one paragraph each."""
    import importlib

    parts: List[str] = []
    for name in names:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", name) != name:
                continue
            parts.append(inspect.getdoc(obj) or "")
    text = "\n\n".join(p.strip() for p in parts if p and p.strip())
    return "".join(c if c == "\n" or 32 <= ord(c) < 127 else "?" for c in text)


class Chars:
    """A character vocabulary: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> List[int]:
        return [self.index.get(c, self.index.get("?", 0)) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def windows(ids: List[int], length: int, limit: Optional[int] = None) -> TensorDataset:
    """Non-overlapping windows of ``length + 1`` characters: inputs ``[:-1]``, targets ``[1:]``."""
    t = torch.tensor(ids, dtype=torch.long)
    n = (len(t) - 1) // length
    if limit is not None:
        n = min(n, limit)
    x = torch.stack([t[i * length : i * length + length] for i in range(n)])
    y = torch.stack([t[i * length + 1 : i * length + length + 1] for i in range(n)])
    return TensorDataset(x, y)


# ---------------------------------------------------------------------------------------------- model
def char_lm(vocab: int, length: int, d_model: int, layers: int, lr: float, weight_decay: float, seed: int):
    """A LightningModule: embedding + learned positions, ``layers`` causal pre-norm
    ``nn.TransformerEncoderLayer``\\ s, a final LayerNorm and an LM head (``[B, T]`` → ``[B, T, V]`` logits),
    trained on the summed next-character cross-entropy with Adam (coupled L2 ``weight_decay``)."""
    import pytorch_lightning as pl

    pl.seed_everything(seed, verbose=False)

    class CharLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.pos = nn.Parameter(0.02 * torch.randn(length, d_model))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(d_model, 2, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(layers))
            self.norm = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

        def forward(self, x: Tensor) -> Tensor:
            t = x.shape[1]
            h = self.embed(x) + self.pos[:t]
            for block in self.blocks:
                h = block(h, src_mask=self.mask[:t, :t], is_causal=True)
            return self.head(self.norm(h))

        def sequence_loss(self, batch) -> Tensor:
            x, y = batch
            return F.cross_entropy(self(x).transpose(1, 2), y, ignore_index=IGNORE, reduction="none").sum(1)

        def training_step(self, batch, batch_idx):
            loss = self.sequence_loss(batch).mean()
            self.log("train/loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, batch_idx):
            per_char = self.sequence_loss(batch).sum() / (batch[1] != IGNORE).sum()
            self.log("val/loss_per_char", per_char)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)

    return CharLM()


@torch.no_grad()
def complete(model, chars: Chars, prompt: str, n: int, length: int) -> str:
    """``n`` characters after ``prompt``, greedily (the most likely next character each time)."""
    model.eval()
    ids = chars.encode(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids[-length:]]))[0, -1]
        ids.append(int(logits.argmax()))
    return chars.decode(ids[len(prompt):])


def completion_queries(chars: Chars, texts: Sequence[Tuple[str, str]], length: int) -> TensorDataset:
    """One query per ``(prompt, completion)``: inputs ``(prompt + completion)[:-1]`` padded to ``length``,
    targets the next characters on the completion only (``-100`` on the prompt and the padding)."""
    xs, ys = [], []
    for prompt, completion in texts:
        ids = chars.encode(prompt + completion)[: length + 1]
        x = torch.zeros(length, dtype=torch.long)
        y = torch.full((length,), IGNORE, dtype=torch.long)
        x[: len(ids) - 1] = torch.tensor(ids[:-1])
        y[: len(ids) - 1] = torch.tensor(ids[1:])
        y[: len(prompt) - 1] = IGNORE  # the prompt is given, not predicted
        xs.append(x)
        ys.append(y)
    return TensorDataset(torch.stack(xs), torch.stack(ys))


def snippet(chars: Chars, x: Tensor, width: int = 48) -> str:
    return json.dumps(chars.decode(x.tolist())[:width])


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    parser = C.parser_for(__doc__, "language_model")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--length", type=int, default=48, help="characters per training window")
    parser.add_argument("--d-model", type=int, default=48)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--completion", type=int, default=16, help="characters completed after each prompt")
    parser.add_argument("--top", type=int, default=3, help="harmful/helpful training windows per completion")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.length, args.d_model, args.layers, args.completion = 2, 24, 16, 1, 8
    out = C.prepare_output(args)
    C.quiet_lightning()
    import pytorch_lightning as pl

    from lightning_influence import InfluenceCallback

    text = docstrings(QUICK_MODULES if args.quick else MODULES)
    chars = Chars(text)
    split = int(0.9 * len(text))
    train = windows(chars.encode(text[:split]), args.length, limit=160 if args.quick else None)
    val = windows(chars.encode(text[split:]), args.length, limit=32 if args.quick else None)
    module = char_lm(len(chars), args.length, args.d_model, args.layers, lr=3e-3, weight_decay=1e-4, seed=args.seed)

    class CompletionQueries(pl.Callback):
        """At the end of training, before the influence callback (listed first): complete the prompts and
        make prompt + completion the queries."""

        def __init__(self) -> None:
            self.texts: List[Tuple[str, str]] = []

        def on_train_end(self, trainer, pl_module):
            self.texts = [(p, complete(pl_module, chars, p, args.completion, args.length)) for p in PROMPTS]
            influence.query_dataloader = DataLoader(completion_queries(chars, self.texts, args.length), batch_size=8)
            influence.query_indices = list(range(len(self.texts)))

    # the real queries arrive when training ends; until then the validation windows stand in for the checks
    influence = InfluenceCallback(solver="ekfac", per_token=True, decode=chars.decode, top_k=args.top,
                                  query_indices=list(range(len(PROMPTS))), damping="auto", on_error="raise")
    queries_cb = CompletionQueries()
    logger = False if args.no_wandb else pl.loggers.WandbLogger(project="lightning-influence-examples",
                                                                name="language_model", save_dir=args.wandb_dir,
                                                                offline=True)
    with C.Stopwatch() as t:
        C.lightning_fit(module, train, val, args.epochs, args.seed, logger=logger, root=out, batch_size=32,
                        callbacks=[queries_cb, influence])
    res = influence.results
    if res is None:
        print(f"influence failed: {influence.error}", file=sys.stderr)
        return 1
    print(f"\n{res}  (fit + influence: {t.seconds:.1f} s)")
    print(f"{len(train)} training windows of {args.length} characters from the docstrings of "
          f"{', '.join(QUICK_MODULES if args.quick else MODULES)}; vocabulary {len(chars)}; "
          f"{res.token_scores.shape[0]} completion characters scored; damping {res.damping:.3g}\n")
    print("Scores are I_up,loss (Koh & Liang): positive = harmful (removing the window would lower the loss of the "
          "completion), negative = helpful. Per-token scores add up to the completion's score.\n")
    summary: Dict[str, object] = {"queries": [], "report": influence.outputs.get("html_path"),
                                  "results": influence.results_path, "seconds": t.seconds}
    for row, (prompt, completion) in enumerate(queries_cb.texts):
        print(f"query {row}: {json.dumps(prompt)} -> {json.dumps(completion)}  (loss {float(res.query_losses[row]):.3g})")
        harmful, helpful = res.top_harmful(row, args.top), res.top_helpful(row, args.top)
        for kind, ranked in (("harmful", harmful), ("helpful", helpful)):
            for i, s in zip(ranked.indices.tolist(), ranked.scores.tolist()):
                print(f"  {kind:7s} #{i:<5d} {s:+10.4g}  {snippet(chars, train.tensors[0][i])}")
        tok = res.tokens_of(row)
        col = {int(i): c for c, i in enumerate(res.train_indices.tolist())}
        per_token = []
        for j, (p, target) in enumerate(zip(tok.positions.tolist(), tok.targets.tolist())):
            c = int(tok.scores[j].argmin())
            i = int(res.train_indices[c])
            per_token.append({"position": p, "char": chars.decode([target]), "most_helpful": i,
                              "score": float(tok.scores[j, c])})
        shown = " ".join(f"{json.dumps(d['char'])}<-#{d['most_helpful']}" for d in per_token)
        print(f"  per character, the most helpful window: {shown}")
        if helpful.indices.numel():
            top = int(helpful.indices[0])
            share = float(tok.scores[:, col[top]].sum()) / float(res.scores[row, col[top]])
            print(f"  (the top helpful window's token scores sum to {share:.6f} × its sequence score)\n")
        summary["queries"].append({"prompt": prompt, "completion": completion,  # type: ignore[union-attr]
                                   "harmful": harmful.indices.tolist(), "helpful": helpful.indices.tolist(),
                                   "tokens": per_token})
    print(f"HTML report (token heat maps): {influence.outputs.get('html_path')}")
    if logger:
        print(f"W&B run (offline): {influence.outputs.get('wandb_run_dir')}")
        import wandb

        wandb.finish()
    C.save_json(out / "language_model.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
