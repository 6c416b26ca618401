"""The demo's side-by-side printout shows the numbers as they are: no cell is cut, columns never touch."""

from __future__ import annotations

import importlib.util
import os

import pytest

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "digits_demo.py")


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("digits_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("score, text", [(-254.3, "score -254.3"), (-109.0, "score -109"), (0.012344, "score +0.01234"),
                                         (12345.6, "score +1.235e+04")])
def test_scores_print_with_their_magnitude(demo, score, text):
    assert demo.score_text(score) == text


def test_side_by_side_cuts_nothing(demo):
    block = ["@@" * 8] * 8
    titles = [["query val[12]", "y=3 p=5"], ["helpful #1234 y=3", demo.score_text(-254.3)],
              ["harmful #7 y=9", demo.score_text(12345.6)]]
    out = demo.side_by_side([block] * 3, titles).splitlines()
    assert len(out) == 2 + 8
    for title in titles:
        for i, line in enumerate(title):
            assert line in out[i]
    first = out[0]
    # each column starts where the previous one's widest line (a 16-character digit, or a longer title) ends,
    # plus two spaces
    starts = [first.index(t[0]) for t in titles]
    assert starts == [0, 16 + 2, 16 + 2 + len("helpful #1234 y=3") + 2]
    assert out[2] == "@@" * 8 + "  " + "@@" * 8 + " " * (len("helpful #1234 y=3") - 16 + 2) + "@@" * 8
