"""The registry of labs: a lab is one claim of the lessons, tested by an experiment that returns numbers,
a plot and a verdict.

A lab module defines ``run(quick: bool, seed: int) -> LabResult`` and registers it with
:func:`register_lab`, naming the claim and where the lessons make it. ``quick=True`` is the seconds-long
version the tests run (smaller sizes, fewer steps); the default is the full experiment (at most a few
minutes on 2 CPU cores). :func:`run_lab` runs one and, given a folder, writes ``NAME/result.json`` and
``NAME/plot.png`` there atomically (and ``NAME/attention/``, a lab's attention maps).

The verdict is computed from the measured numbers against a criterion the lab states before it runs
(``criterion``); where the lessons overstate, the lab says so ("not supported") with the numbers. A lab that
trains models first checks, by its own test, that they learned enough for the criterion to mean something
(e.g. a held-out loss clearly below the unigram baseline); when they did not (a quick run's few steps), the
verdict is "undecided" and says why, rather than a verdict the full run may contradict.

Long loops (training) show a tqdm bar on stderr through :func:`progress_bar` when :func:`run_lab` is asked
for ``progress`` (``archlab lab`` without ``--json``); otherwise labs print nothing.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archlab.errors import ConfigError, unknown

VERDICTS = ("supported", "not supported", "undecided")
QUICK_UNDECIDED = "undecided (quick)"  # how a quick run that cannot decide is shown (its verdict stays "undecided")
_PROGRESS: ContextVar[bool] = ContextVar("archlab_lab_progress", default=False)  # set by run_lab


@dataclass
class LabResult:
    """What a lab measured.

    Args:
        columns: the table's header.
        rows: the table, one list per row (numbers or short strings), as printed and saved.
        criterion: the test the numbers are held to, in words with its thresholds (stated by the lab).
        supported: whether the numbers meet ``criterion``.
        finding: one or two sentences with the numbers behind the verdict.
        plot: draws the figure on a ``matplotlib.figure.Figure`` (None: no plot).
        notes: caveats (scale, what the small experiment cannot show).
        undecided: why the numbers cannot decide (the lab's models did not learn enough for its criterion to
            mean anything), with the figures; non-empty makes the verdict "undecided" whatever ``supported`` says.
        attention: attention maps the lab drew from its model (an
            :class:`~archlab.analysis.attention_maps.AttentionMaps`), written to ``NAME/attention/`` as
            ``archlab attention`` writes them (a PNG per layer with the tokens on the axes, ``attention.json``);
            the report shows them on the lab's page. None: the lab has none.
    """

    columns: list[str]
    rows: list[list[Any]]
    criterion: str
    supported: bool
    finding: str
    plot: Callable[[Any], None] | None = None
    notes: str = ""
    undecided: str = ""
    attention: Any = None

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ConfigError(f"a lab row has {len(row)} cells for {len(self.columns)} columns: {row!r}")

    @property
    def verdict(self) -> str:
        if self.undecided:
            return VERDICTS[2]
        return VERDICTS[0] if self.supported else VERDICTS[1]


@dataclass(frozen=True)
class Lab:
    name: str
    claim: str  # the claim as the lessons make it (quoted or closely paraphrased)
    source: str  # where: "lesson 4, card 1", "deck: scaled dot-product", "notes 3.2"
    run: Callable[[bool, int], LabResult]
    tags: tuple[str, ...] = field(default_factory=tuple)
    minutes: float = 1.0  # the full run's wall time on 2 idle CPU cores, as measured (shown by `archlab lab list`)

    @property
    def long(self) -> bool:
        """Whether the full run takes more than LONG_MINUTES (``archlab lab list`` says so)."""
        return self.minutes > LONG_MINUTES


def verdict_label(verdict: str, quick: bool) -> str:
    """The verdict as shown to a reader: :data:`QUICK_UNDECIDED` for a ``--quick`` run that cannot decide (the full
    run may), else ``verdict`` itself; the saved ``result.json`` keeps the plain verdict and its ``quick`` flag."""
    return QUICK_UNDECIDED if quick and verdict == VERDICTS[2] else verdict


LABS: dict[str, Lab] = {}
LONG_MINUTES = 5.0


def register_lab(name: str, claim: str, source: str, tags: Sequence[str] = (), minutes: float = 1.0) -> Callable:
    """Decorator for a lab's ``run(quick, seed) -> LabResult``; ``minutes``: the full run's measured wall time
    on 2 idle CPU cores (labs over LONG_MINUTES are flagged in ``archlab lab list``)."""

    def add(run: Callable[[bool, int], LabResult]) -> Callable[[bool, int], LabResult]:
        if name in LABS:
            raise ConfigError(f"lab {name!r} is registered twice")
        LABS[name] = Lab(name, claim, source, run, tuple(tags), float(minutes))
        return run

    return add


def list_labs() -> list[Lab]:
    return [LABS[name] for name in sorted(LABS)]


def get_lab(name: str) -> Lab:
    if name not in LABS:
        raise ConfigError(unknown("lab", name, LABS))
    return LABS[name]


@dataclass
class LabReport:
    """A lab's result with its identity and run settings; ``files`` holds what was written."""

    lab: Lab
    result: LabResult
    quick: bool
    seed: int
    seconds: float
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            "lab": self.lab.name, "claim": self.lab.claim, "source": self.lab.source,
            "verdict": r.verdict, "undecided": r.undecided, "criterion": r.criterion, "finding": r.finding,
            "notes": r.notes,
            "columns": r.columns, "rows": [[_jsonable(c) for c in row] for row in r.rows],
            "quick": self.quick, "seed": self.seed, "seconds": round(self.seconds, 2),
            "files": [str(f) for f in self.files],
        }  # fmt: skip

    @property
    def verdict_label(self) -> str:
        """The verdict as shown (:func:`verdict_label`): "undecided (quick)" for a quick run that cannot decide."""
        return verdict_label(self.result.verdict, self.quick)

    def describe(self) -> str:
        """The report as text: claim, table, criterion, verdict."""
        r = self.result
        cells = [r.columns] + [[_format(c) for c in row] for row in r.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(r.columns))]
        table = ["  " + "  ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True)) for row in cells]
        table.insert(1, "  " + "  ".join("-" * w for w in widths))
        mode = "quick" if self.quick else "full"
        lines = [f"{self.lab.name}: {self.lab.claim}", f"  ({self.lab.source}; {mode} run, seed {self.seed}, "
                 f"{self.seconds:.1f} s)", "", *table, "", f"  criterion: {r.criterion}",
                 f"  verdict:   {self.verdict_label.upper()}: {r.undecided + '; ' if r.undecided else ''}{r.finding}"]  # fmt: skip
        if r.notes:
            lines.append(f"  notes:     {r.notes}")
        lines += [f"  wrote:     {f}" for f in self.files]
        return "\n".join(lines)


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside (the caller's count restored after): for labs of many tiny operations,
    where a second thread only adds waiting, and whose float64 sums then do not depend on the thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress_bar(total: int, what: str):
    """A tqdm bar over ``total`` steps of ``what`` (e.g. ``"training rope"``) on stderr, shown only inside a
    :func:`run_lab` asked for ``progress``; it disappears when closed. Use as a context manager."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=not _PROGRESS.get())  # fmt: skip


def check_lab_seed(seed: object) -> None:
    """ConfigError unless ``seed`` is one every lab can take: labs seed NumPy's global generator too."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r} must be an int >= 0 and < 2**32 (the seeds NumPy's global generator takes)")


def run_lab(
    name: str, *, quick: bool = False, seed: int = 0, out: str | Path | None = None, progress: bool = False
) -> LabReport:
    """Run lab ``name``; with ``out``, write ``out/NAME/result.json``, ``out/NAME/plot.png`` and any attention maps
    (``out/NAME/attention/``) atomically; with ``progress``, its long loops show bars on stderr
    (:func:`progress_bar`)."""
    import numpy as np
    import torch

    lab = get_lab(name)
    check_lab_seed(seed)
    start = time.perf_counter()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    shown = _PROGRESS.set(progress)
    try:  # a lab seeds what it uses and leaves the caller's generators (torch, Python, NumPy) as they were
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            result = lab.run(quick, seed)
    finally:
        _PROGRESS.reset(shown)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    report = LabReport(lab, result, quick, seed, time.perf_counter() - start)
    if out is not None:
        _write(report, Path(out) / name)
    return report


def _write(report: LabReport, folder: Path) -> None:
    from archlab.interop.io import atomic_dir

    with atomic_dir(folder) as tmp:
        names = ["result.json"]
        if report.result.plot is not None and _plot(report, tmp / "plot.png"):
            names.append("plot.png")
        if report.result.attention is not None:
            from archlab.analysis.attention_maps import write_maps

            names += [f"attention/{f.name}" for f in write_maps(report.result.attention, tmp / "attention")]
        report.files = [folder / n for n in names]
        (tmp / "result.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def _plot(report: LabReport, path: Path) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib is a dependency; without it the numbers are still written
        return False
    fig = Figure(figsize=(9, 4.2), dpi=110, layout="constrained")  # room for titles, labels and colour bars
    FigureCanvasAgg(fig)
    report.result.plot(fig)
    fig.suptitle(f"{report.lab.name}: {report.verdict_label}", fontsize=10)
    fig.savefig(str(path))
    return True


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # a 0-dim tensor or numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _format(value: Any) -> str:
    value = _jsonable(value)
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
