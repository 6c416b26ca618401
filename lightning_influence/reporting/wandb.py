"""The W&B output: tables with example previews, histograms, summary, config and an artifact, logged to a
wandb run: the user's own, or that of the trainer's ``WandbLogger``.
:class:`~lightning_influence.reporting.reporters.Wandb` is the reporter.

``wandb`` is imported only inside these functions, and only when there is a run to write to; the user's
run is neither re-initialised nor finished. Nothing here imports Lightning. Everything lands in one
``run.log`` call (one history row, with
``trainer/global_step``), plus summary values, config and one artifact.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..record import RunKey
from ..results import InfluenceResults
from . import keys
from .content import HARMFUL, HELPFUL, SIGN_CONVENTION, SUSPECTS, Entry, QueryView, SeriesLine, series_lines
from .evolution import kept_fractions, rankings
from .previews import ExampleCatalog, Preview
from .scalars import config_values, summary_scalars, summary_values
from .tokens import TokenView

__all__ = [
    "log_to_wandb",
    "log_epoch_to_wandb",
    "over_epochs_row",
    "OVER_EPOCHS_COLUMNS",
    "OVER_EPOCHS_KEY",
    "QUERY_COLUMNS",
    "EXAMPLE_COLUMNS",
    "SUSPECT_COLUMNS",
    "SERIES_COLUMNS",
    "SERIES_PREFIX",
    "TOKEN_COLUMNS",
    "TOKEN_KEY",
    "ARTIFACT_TYPE",
    "MAX_TABLE_ROWS",
]

#: W&B cuts tables at this many rows; the full score matrix is in the artifact instead
MAX_TABLE_ROWS = 10_000
ARTIFACT_TYPE = "influence-scores"
QUERY_COLUMNS = [
    "query_id", "preview", "label", "prediction", "query_loss",
    "helpful_ids", "helpful_scores", "helpful_labels", "helpful_previews",
    "harmful_ids", "harmful_scores", "harmful_labels", "harmful_previews",
]
EXAMPLE_COLUMNS = [
    "query_id", "query_label", "query_prediction", "rank", "kind", "meaning",
    "train_id", "score", "pred_delta_loss", "label", "preview",
]
SUSPECT_COLUMNS = ["rank", "train_id", "self_influence", "label", "preview"]
#: the queries table gets one more column per per-query solver diagnostic with a recorded value, named as
#: the diagnostic (``relative_stderr``; ``diagnostic_<name>`` where that would clash with these columns)

#: one line chart per series diagnostic, logged under ``SERIES_PREFIX + name`` (its table W&B stores under
#: that key + ``"_table"``): one row per point of each curve; ``series`` names the line (chunk, queries,
#: curve), ``chunk``/``first_query``/``last_query`` are empty for a series recorded outside the query solves
SERIES_COLUMNS = ["series", "chunk", "first_query", "last_query", "curve", "x", "y"]
SERIES_PREFIX = "influence/series/"
#: how the top examples move across the runs of a fit (``every_n_epochs``), re-logged after every run with all
#: runs so far: one row per ranked example; ``query_id`` empty = ranked by the mean score over the run's
#: queries; ``kind`` harmful / helpful / self_influence; ``previous_rank`` its rank in the previous run's
#: list of the same kind and query (empty: not listed); ``new`` whether it was not listed there
OVER_EPOCHS_KEY = "influence/over_epochs"
OVER_EPOCHS_COLUMNS = ["epoch", "global_step", "kind", "query_id", "rank", "train_id", "score", "label",
                       "previous_rank", "new"]
#: per-token influence (``per_token=True``): one row per scored token of each query and kind (the training
#: sequence with the most harmful / most helpful score for that token); ``token`` is its decoded text
#: (``decode``) or id, ``score`` the token's score, ``train_sequence_score`` that training sequence's score
#: for the whole query
TOKEN_KEY = keys.table("token_influence")
TOKEN_COLUMNS = ["query_id", "position", "token_id", "token", "kind", "train_id", "score", "train_sequence_score",
                 "train_preview"]
_MEANING = {"helpful": HELPFUL.split("(", 1)[1].rstrip(")"), "harmful": HARMFUL.split("(", 1)[1].rstrip(")")}


class _Previews:
    """W&B values for one table, each example rendered once."""

    def __init__(self, catalog: ExampleCatalog, prefix: str) -> None:
        self.catalog, self.prefix = catalog, prefix
        self._values: Dict[int, Any] = {}

    def __call__(self, index: int) -> Any:
        if index not in self._values:
            label = self.catalog.label(index)
            caption = f"{self.prefix} #{index}" + ("" if label is None else f" · label {label}")
            self._values[index] = self.catalog.preview(index).to_wandb(caption)
        return self._values[index]


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


#: W&B's limit on an artifact's metadata keys (``ValueError: Artifact must not have more than 100 metadata
#: keys``); the artifact carries the run's headline numbers, the files carry everything
MAX_METADATA_KEYS = 100


def _montage(previews: Sequence[Preview], gap: int = 2) -> Optional[np.ndarray]:
    """The pixels of image previews side by side (white gaps), or ``None`` when any is not an image."""
    if not previews or any(p.pixels is None for p in previews):
        return None
    rgb = any(p.pixels.ndim == 3 for p in previews)  # type: ignore[union-attr]
    tiles = [np.repeat(p.pixels[..., None], 3, axis=2) if rgb and p.pixels.ndim == 2 else p.pixels for p in previews]  # type: ignore[union-attr,index]
    h = max(t.shape[0] for t in tiles)
    shape = (h, sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)) + ((3,) if rgb else ())
    out = np.full(shape, 255, dtype=np.uint8)
    x = 0
    for t in tiles:
        out[: t.shape[0], x : x + t.shape[1]] = t
        x += t.shape[1] + gap
    return out


def _strip(entries: Sequence[Entry], catalog: ExampleCatalog, kind: str) -> Any:
    """One cell showing a query's top examples of one kind: a montage image, else their texts; ``None``
    when the query has no example of that kind."""
    import wandb

    if not entries:
        return None
    previews = [catalog.preview(e.train_id) for e in entries]
    ids = ", ".join(f"#{e.train_id}" for e in entries)
    pixels = _montage(previews)
    if pixels is not None:
        scale = max(1, 48 // max(pixels.shape[0], 1))
        pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
        return wandb.Image(pixels, caption=f"{kind}, left to right: {ids}")
    if all(p.text is not None for p in previews):
        return " | ".join(f"#{e.train_id}: {p.text}" for e, p in zip(entries, previews))
    return f"{ids} (previews in influence/top_examples)"


def _query_label(view: QueryView, query: ExampleCatalog) -> Any:
    label = query.label(view.query_id)
    return view.target if label is None else label


def _tables(
    views: Sequence[QueryView],
    suspects: Sequence[Entry],
    train: ExampleCatalog,
    query: ExampleCatalog,
) -> Dict[str, Any]:
    import wandb

    per_query = max((len(v.helpful) + len(v.harmful) for v in views), default=0)
    if per_query and len(views) * per_query > MAX_TABLE_ROWS:
        keep = MAX_TABLE_ROWS // per_query
        _warn(
            f"The influence/top_examples table would have {len(views) * per_query} rows; W&B keeps "
            f"{MAX_TABLE_ROWS}, so the W&B tables show the first {keep} queries. All scores are in the artifact."
        )
        views = views[:keep]
    train_values, query_values = _Previews(train, "train"), _Previews(query, "query")

    extra = _diagnostic_columns(views)
    qt = wandb.Table(columns=QUERY_COLUMNS + list(extra.values()))
    for v in views:
        row: List[Any] = [v.query_id, query_values(v.query_id), _query_label(v, query), v.prediction, v.loss]
        for kind, entries in (("helpful", v.helpful), ("harmful", v.harmful)):
            row += [
                [e.train_id for e in entries],
                [e.score for e in entries],
                [train.label(e.train_id) for e in entries],
                _strip(entries, train, kind),
            ]
        row += [v.diagnostics.get(name) for name in extra]
        qt.add_data(*row)

    et = wandb.Table(columns=EXAMPLE_COLUMNS)
    for v in views:
        qlabel = _query_label(v, query)
        for e in list(v.helpful) + list(v.harmful):
            et.add_data(
                v.query_id, qlabel, v.prediction, e.rank, e.kind, _MEANING[e.kind],
                e.train_id, e.score, e.delta_loss, train.label(e.train_id), train_values(e.train_id),
            )
    tables = {"influence/queries": qt, "influence/top_examples": et}
    if suspects:
        st = wandb.Table(columns=SUSPECT_COLUMNS)
        for e in suspects:
            st.add_data(e.rank, e.train_id, e.score, train.label(e.train_id), train_values(e.train_id))
        tables["influence/self_influence"] = st
    return tables


def _token_table(tokens: Sequence[TokenView], results: InfluenceResults, train: ExampleCatalog) -> Any:
    """:data:`TOKEN_KEY`'s table, at most :data:`MAX_TABLE_ROWS` rows."""
    import wandb

    column = {int(i): c for c, i in enumerate(results.train_indices.tolist())}
    table = wandb.Table(columns=TOKEN_COLUMNS)
    rows = [(tv, t, kind) for tv in tokens for t in tv.tops for kind in ("harmful", "helpful")]
    if len(rows) > MAX_TABLE_ROWS:
        _warn(f"The {TOKEN_KEY} table would have {len(rows)} rows; W&B keeps {MAX_TABLE_ROWS}, so it shows the first "
              f"{MAX_TABLE_ROWS}. All token scores are in the artifact's results.pt (token_scores).")
    previews = _Previews(train, "train")
    for tv, t, kind in rows[:MAX_TABLE_ROWS]:
        train_id, score = (t.harmful_id, t.harmful_score) if kind == "harmful" else (t.helpful_id, t.helpful_score)
        sequence = float(results.scores[tv.row, column[train_id]])
        table.add_data(tv.query_id, t.position, t.token_id, t.text, kind, train_id, score, sequence, previews(train_id))
    return table


def _diagnostic_columns(views: Sequence[QueryView]) -> Dict[str, str]:
    """``{diagnostic name: column name}`` for the per-query diagnostics with a value for some query."""
    names: Dict[str, str] = {}
    for v in views:
        for name, value in v.diagnostics.items():
            if value is not None and name not in names:
                names[name] = f"diagnostic_{name}" if name in QUERY_COLUMNS else name
    order = list(views[0].diagnostics) if views else []
    return {name: names[name] for name in order if name in names}


def _series_chart(name: str, lines: Sequence[SeriesLine]) -> Any:
    """A W&B line chart of one series diagnostic: :data:`SERIES_COLUMNS` rows (``x`` across, ``y`` up, one
    line per chunk and curve), titled with the diagnostic's label, at most :data:`MAX_TABLE_ROWS` rows."""
    import wandb

    table = wandb.Table(columns=SERIES_COLUMNS)
    rows = 0
    total = sum(len(s.x) for s in lines)
    if total > MAX_TABLE_ROWS:
        _warn(
            f"The series diagnostic {name!r} has {total} points; W&B keeps {MAX_TABLE_ROWS} table rows, so "
            f"{SERIES_PREFIX}{name} shows the first {MAX_TABLE_ROWS}. All of it is in the artifact's results.pt."
        )
    for s in lines:
        last = None if s.stop is None or s.start is None else max(s.stop - 1, s.start)
        for x, y in zip(s.x, s.y):
            if rows == MAX_TABLE_ROWS:
                break
            table.add_data(s.line_label, s.chunk, s.start, last, s.curve, x, y)
            rows += 1
    return wandb.plot.line(table, x="x", y="y", stroke="series", title=lines[0].label)


def _histogram(values: Any) -> Any:
    import wandb

    v = values.detach().reshape(-1).double().cpu().numpy()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    return wandb.Histogram(np_histogram=np.histogram(v, bins=64))


def log_to_wandb(
    run: Any,
    results: InfluenceResults,
    views: Sequence[QueryView],
    suspects: Sequence[Entry],
    train: ExampleCatalog,
    query: ExampleCatalog,
    *,
    step: int = 0,
    results_path: Optional[str] = None,
    html: Optional[str] = None,
    history: Optional[Mapping[Any, InfluenceResults]] = None,
    history_paths: Optional[Mapping[Any, str]] = None,
    top_k: int = 10,
    tokens: Sequence[TokenView] = (),
) -> Dict[str, Any]:
    """Log tables, histograms, scalars (one row), summary, config and the ``influence-scores`` artifact to
    ``run`` (a wandb run), at ``trainer/global_step = step``. With a ``history`` of more than one run (``{epoch: results}``), the row also holds
    :data:`OVER_EPOCHS_KEY` and the kept fractions (:func:`over_epochs_row`), and the artifact the runs'
    results files (``history_paths``, as ``epoch_<k>/results.pt``). With per-token scores (``tokens``), the
    row holds :data:`TOKEN_KEY`. Returns the run directory, the artifact name and the logged keys."""
    import wandb

    step = int(step)
    row: Dict[str, Any] = dict(_tables(views, suspects, train, query))
    if tokens:
        row[TOKEN_KEY] = _token_table(tokens, results, train)
    if history is not None and len(history) > 1:
        row.update(over_epochs_row(history, train, top_k, len(suspects) or None))
    series = series_lines(results)
    for name, lines in series.items():
        row[SERIES_PREFIX + name] = _series_chart(name, lines)
    hist = _histogram(results.scores)
    if hist is not None:
        row["influence/score_histogram"] = hist
    if results.self_influence is not None:
        hist = _histogram(results.self_influence)
        if hist is not None:
            row["influence/self_influence_histogram"] = hist
    if html is not None:
        row[keys.table("report")] = wandb.Html(html, inject=False)
    row.update(summary_scalars(results))
    row["trainer/global_step"] = step
    run.log(row)

    run.config.update(config_values(results), allow_val_change=True)
    summary = summary_values(results)
    summary["influence/sign_convention"] = SIGN_CONVENTION
    summary["influence/helpful"] = HELPFUL
    summary["influence/harmful"] = HARMFUL
    if suspects:
        summary["influence/self_influence_meaning"] = SUSPECTS
    meanings = _diagnostic_meanings(results, series)
    if meanings:
        summary["influence/diagnostic_meanings"] = meanings

    artifact_name = f"influence-{run.id}"
    artifact = wandb.Artifact(
        artifact_name,
        type=ARTIFACT_TYPE,
        description="InfluenceResults (load with InfluenceResults.load('results.pt')). " + SIGN_CONVENTION,
        metadata=artifact_metadata(results, step),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = results_path
        if path is None or not os.path.isfile(path):
            path = os.path.join(tmp, "results.pt")
            results.save(path)
        artifact.add_file(path, name="results.pt")  # copied to wandb's staging area now
        if html is not None:
            page = os.path.join(tmp, "report.html")
            with open(page, "w", encoding="utf-8") as fh:
                fh.write(html)
            artifact.add_file(page, name="report.html")
        for run_key, run_path in sorted((history_paths or {}).items()):
            if os.path.isfile(run_path):
                artifact.add_file(run_path, name=f"{_folder(run_key)}/results.pt")
        run.log_artifact(artifact, aliases=["latest", f"step-{step}"])
    summary["influence/artifact"] = f"{artifact_name}:latest"
    run.summary.update(summary)
    return {
        "wandb_run_dir": os.path.dirname(os.path.abspath(run.dir)) if getattr(run, "dir", None) else None,
        "wandb_run_id": run.id,
        "wandb_artifact": f"{artifact_name}:latest",
        "wandb_keys": sorted(_logged_key(k, v) for k, v in row.items()),
    }


def _folder(run_key: Any) -> str:
    """The artifact folder of a run's results file: ``epoch_2`` (an epoch run), ``step_300`` (a step run)."""
    if isinstance(run_key, RunKey):
        return f"step_{run_key.global_step}" if run_key.trigger == "step" else f"epoch_{run_key.epoch}"
    return f"epoch_{int(run_key)}"


def artifact_metadata(results: InfluenceResults, step: int) -> Dict[str, Any]:
    """The artifact's metadata: the solver, the damping, sizes, the score summary and timings, within W&B's
    :data:`MAX_METADATA_KEYS` whatever the solver's diagnostics (all of them are in the files)."""
    scalars = summary_scalars(results)
    head = {k: v for k, v in scalars.items() if not k.startswith(keys.diagnostic_prefix())}
    meta: Dict[str, Any] = {keys.SOLVER: results.solver, "global_step": int(step), **head}
    for k in ("damping_mode", "dtype", "num_params", "num_train_total"):
        if k in results.settings:
            meta[keys.setting(k)] = results.settings[k]
    return dict(list(meta.items())[:MAX_METADATA_KEYS])


def over_epochs_row(
    history: Mapping[int, InfluenceResults], train: ExampleCatalog, top_k: int, suspects_k: Optional[int] = None
) -> Dict[str, Any]:
    """:data:`OVER_EPOCHS_KEY`: a table of every run's rankings (:func:`.evolution.rankings`, at most
    :data:`MAX_TABLE_ROWS` rows: the per-query rows go first when there are more), and the latest run's
    kept fractions (``influence/over_epochs/<kind>_kept``, 0..1)."""
    import wandb

    ranked = rankings(history, top_k, suspects_k)
    if sum(len(r.train_ids) for r in ranked) > MAX_TABLE_ROWS:
        ranked = [r for r in ranked if r.query_id is None]
        _warn(
            f"The {OVER_EPOCHS_KEY} table would exceed W&B's {MAX_TABLE_ROWS} rows; it keeps the rankings by mean "
            "score over the queries and the self-influence suspects, without the per-query rankings (all of "
            "them are in each run's results file)."
        )
    table = wandb.Table(columns=OVER_EPOCHS_COLUMNS)
    rows = [
        (r, rank, i, score, prev)
        for r in ranked
        for rank, (i, score, prev) in enumerate(zip(r.train_ids, r.scores, r.previous_ranks), start=1)
    ]
    for r, rank, i, score, prev in rows[-MAX_TABLE_ROWS:]:
        table.add_data(r.epoch, r.global_step, r.kind, r.query_id, rank, i, score, train.label(i), prev,
                       r.kept is not None and prev is None)
    out: Dict[str, Any] = {OVER_EPOCHS_KEY: table}
    out.update(kept_fractions(history, top_k, suspects_k))
    return out


def log_epoch_to_wandb(
    run: Any,
    results: InfluenceResults,
    epoch: int,
    history: Mapping[int, InfluenceResults],
    train: ExampleCatalog,
    step: int = 0,
    top_k: int = 10,
    suspects_k: Optional[int] = None,
    key: Optional[RunKey] = None,
) -> Dict[str, Any]:
    """One run inside the training loop (``every_n_epochs``, ``every_n_steps``): one row with the run's
    summary scalars (the same keys as the final report, so each is a curve over the steps),
    ``influence/epoch`` and, from the second run on, :func:`over_epochs_row`. No previews, histograms or
    artifact: the final report has them. Returns the run directory and the logged keys."""
    row: Dict[str, Any] = dict(summary_scalars(results))
    row[keys.EPOCH] = int(epoch)
    if key is not None:
        row[keys.GLOBAL_STEP] = int(key.global_step)
    if len(history) > 1:
        row.update(over_epochs_row(history, train, top_k, suspects_k))
    row["trainer/global_step"] = int(step)
    run.log(row)
    return {
        "wandb_run_dir": os.path.dirname(os.path.abspath(run.dir)) if getattr(run, "dir", None) else None,
        "wandb_run_id": run.id,
        "wandb_keys": sorted(row),
    }


def _diagnostic_meanings(results: InfluenceResults, series: Dict[str, List[SeriesLine]]) -> Dict[str, str]:
    """``{name: "label: meaning"}`` for every diagnostic the run shows: the summary scalars (under their
    logged names), the per-query columns and the series charts."""
    shown = list(results.summary_diagnostics())
    for name in [*results.per_query_diagnostics(), *series]:
        d = results.diagnostic(name)
        if d is not None:
            shown.append(d)
    return {d.name: f"{d.label}: {d.meaning}" if d.meaning else d.label for d in shown}


def _logged_key(key: str, value: Any) -> str:
    """The history key ``value`` ends up under: W&B stores a chart's data as a table beside it."""
    spec = getattr(value, "spec", None)
    try:
        return spec.table_key if spec is not None else key
    except Exception:  # noqa: BLE001 - a wandb version without table_key: the key as given
        return key
