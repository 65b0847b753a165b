"""Lab result folders for the report tests, as ``archlab lab --out`` writes them: two labs with plots, one with an
attention map and hostile text (:func:`write_labs`); the ``labs_dir`` fixture (conftest.py) builds them once."""

from __future__ import annotations

import json

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from archlab.labs import list_labs

HOSTILE = '<script>alert("x")</script> & "quotes" <b>'


def png(path, colour: str) -> None:
    fig = Figure(figsize=(4, 2), dpi=60)
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1, 2], [1, 3, 2], color=colour)
    fig.savefig(str(path))


def result(name: str, verdict: str, **extra) -> dict:
    lab = next(lab for lab in list_labs() if lab.name == name)
    return {
        "lab": name, "claim": lab.claim, "source": lab.source, "verdict": verdict, "undecided": "", "notes": "",
        "criterion": "x >= 1", "finding": "x = 2", "columns": ["model", "x"], "rows": [["a", 2.0], ["b", 123456]],
        "quick": False, "seed": 0, "seconds": 1.5, "files": [], **extra,
    }  # fmt: skip


def write_labs(root) -> None:
    names = [lab.name for lab in list_labs()]
    first, second = names[0], names[1]
    for name, verdict, extra in (
        (first, "supported", {}),
        (second, "undecided", {"undecided": f"too few steps {HOSTILE}", "notes": HOSTILE, "rows": [[HOSTILE, 1.0]]}),
    ):
        folder = root / name
        folder.mkdir()
        (folder / "result.json").write_text(json.dumps(result(name, verdict, **extra)))
        png(folder / "plot.png", "C0")
    (root / second / "attention").mkdir()
    png(root / second / "attention" / "00-self-decoder-blocks-0-attn.png", "C3")
