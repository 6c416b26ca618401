"""The HTML report: self-contained, with the expected sections, rendered in a real headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from lightning_influence.diagnostics import Diagnostic
from lightning_influence.reporting.content import query_views, suspects
from lightning_influence.reporting.html import render_html, write_html
from lightning_influence.reporting.previews import ExampleCatalog
from lightning_influence.results import InfluenceResults

from ..problems import digits

Q, K, N = 3, 4, 120

#: appended to a copy of the report: records, once everything has loaded, what loaded and what did not
_LOAD_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const out = document.createElement('pre');
  out.id = 'load-check';
  out.textContent = JSON.stringify({
    images: imgs.length, broken: broken,
    widths: imgs.map(i => i.naturalWidth),
    resources: performance.getEntriesByType('resource').map(e => e.name),
    sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
    histograms: document.querySelectorAll('svg.histogram').length,
    seriesLines: Array.from(document.querySelectorAll('svg.series-chart polyline'))
      .map(p => p.getBoundingClientRect().width),
  });
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report over 8×8 digits, with synthetic scores (the layout does not depend on how they were
    computed)."""
    train, val = digits(torch.float32, n_train=N, image=True)
    g = torch.Generator().manual_seed(0)
    results = InfluenceResults(
        scores=torch.randn(Q, N, generator=g),
        query_indices=torch.tensor([3, 17, 40]),
        train_indices=torch.arange(N),
        query_losses=torch.rand(Q, generator=g),
        self_influence=-torch.rand(N, generator=g),
        query_targets=val.tensors[1][[3, 17, 40]],
        query_predictions=torch.tensor([1, 2, 3]),
        settings={"solver": "lissa", "depth": 100, "scale": 10.0, "damping": 0.01, "damping_mode": "fixed",
                  "num_train_total": N},
        diagnostics={
            "solver": "lissa",
            "setup": [Diagnostic("damping", 0.01, "damping λ").to_dict(),
                      Diagnostic("scale", 10.0, "scale s", "each step divides the residual by s").to_dict()],
            "solve": [{"start": 0, "stop": Q, "items": [
                Diagnostic("converged", True, "converged", reduce="all").to_dict(),
                Diagnostic("relative_stderr", [0.02, 0.04, 0.03], "relative std. error of the scores",
                           kind="per_query").to_dict(),
                Diagnostic("norm_history", [{"label": f"repeat {r}", "x": [25, 50, 100], "y": y}
                                            for r, y in enumerate(([1.0, 2.0, 2.4], [1.0, 2.1, 2.3]))],
                           "‖h_t‖/‖v‖ (max over the chunk's queries)", "levels off when converged",
                           kind="series").to_dict(),
            ]}],
            "totals": [Diagnostic("hvp_calls", 240, "Hessian-vector products", reduce="sum").to_dict()],
        },
        timings={"query_gradients": 0.1, "solve": 1.0, "scoring": 0.5, "total": 1.6},
    )
    train_cat, val_cat = ExampleCatalog(train), ExampleCatalog(val)
    path = tmp_path_factory.mktemp("html") / "report.html"
    text = render_html(results, query_views(results, K), suspects(results, 6), train_cat, val_cat)
    write_html(path, text)
    return {"path": path, "text": text, "results": results, "rendered": len(train_cat)}


def test_sections_and_sign_convention(report):
    text, res = report["text"], report["results"]
    for section in ("queries", "histograms", "self-influence", "settings"):
        assert f'<section id="{section}">' in text
    assert text.count('<article class="query"') == Q
    assert text.count('class="example helpful"') == Q * K and text.count('class="example harmful"') == Q * K
    assert text.count('class="example self_influence"') == 6
    assert "helpful (removing it would raise the query loss)" in text
    assert "harmful (removing it would lower the query loss)" in text
    first = re.search(r'<article class="query" id="query-3".*?</article>', text, re.S).group(0)
    harmful_ids = re.findall(r'class="example harmful" data-train-id="(\d+)"', first)
    assert [int(i) for i in harmful_ids] == res.top_harmful(0, K).indices.tolist()
    assert 'id="score-histogram"' in text and 'id="self-influence-histogram"' in text
    assert 'id="settings-table"' in text and ">lissa<" in text
    assert 'id="diagnostics-table"' in text and 'id="per-query-diagnostics"' in text
    assert 'id="series-norm_history"' in text
    assert report["rendered"] < N  # previews only for the examples shown


def test_self_contained(report):
    text = report["text"]
    assert not re.search(r'(src|href)="(?!data:|#)', text), "every src/href must be a data URI or an anchor"
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert text.count('src="data:image/png;base64,') == Q + 2 * Q * K + 6


def test_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (CI installs it: apt-get install -y --no-install-recommends chromium)")
    checked = tmp_path / "checked.html"
    checked.write_text(report["text"].replace("</body>", _LOAD_CHECK + "</body>"), encoding="utf-8")
    flags = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--window-size=1200,2400",
    ]
    dom = subprocess.run(flags + ["--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="load-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"no load check in the DOM; chromium said: {dom.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    assert check["images"] == Q + 2 * Q * K + 6 and check["broken"] == []
    assert all(w > 0 for w in check["widths"])
    assert check["resources"] == []  # nothing fetched from files or the network
    assert check["sections"] == ["queries", "histograms", "self-influence", "settings"]
    assert check["histograms"] == 2
    assert len(check["seriesLines"]) == 2 and all(w > 100 for w in check["seriesLines"])  # drawn, not empty

    shot = tmp_path / "report.png"  # kept as a test artifact
    subprocess.run(flags + [f"--screenshot={shot}", os.fspath(report["path"].as_uri())],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
