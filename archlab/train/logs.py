"""What a run reports: a tqdm bar (loss, lr, tokens/s), ``metrics.jsonl``, TensorBoard events when
``tensorboard`` is installed, and ``loss.png`` drawn from the JSONL file. Only rank 0 reports.

``metrics.jsonl`` has one JSON object per line: ``{"split": "train" | "eval", "step": ..., "loss": ...,
...}`` for metrics and ``{"message": ...}`` for notes such as the precision in use. A resumed run appends
to the same file; :func:`read_metrics` keeps the last record of each (split, step).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from archlab.errors import DataError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class RunLog:
    """Progress bar + JSONL + TensorBoard for one run; every method is a no-op when ``enabled`` is False."""

    def __init__(
        self,
        out_dir: Path | None,
        *,
        enabled: bool = True,
        total: int,
        initial: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
        unigram_loss: float | None = None,
    ):
        self.enabled = enabled
        self.out_dir = out_dir
        self.unigram_loss = unigram_loss  # drawn on loss.png
        self.messages: list[str] = []
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            repair_metrics(out_dir / METRICS_FILE)
            if (out_dir / METRICS_FILE).is_file():
                read_metrics(out_dir / METRICS_FILE)  # damage is said now, not after training
            self._jsonl = open(out_dir / METRICS_FILE, "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    pass  # optional: TensorBoard events only when it is installed
                else:
                    self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        if progress:
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def message(self, text: str) -> None:
        """A note for the user: printed once (above the bar) and kept in the JSONL file."""
        if not self.enabled:
            return
        self.messages.append(text)
        if self._bar is not None:  # above the bar, on stderr like it (stdout may be --json's)
            self._bar.write(f"archlab: {text}", file=sys.stderr)
        else:
            print(f"archlab: {text}", file=sys.stderr)
        self._write({"message": text})

    def record(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        """One line of metrics (and TensorBoard scalars ``split/name``)."""
        if not self.enabled:
            return
        self._write({"split": split, "step": step, **metrics})
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{name}", value, step)

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float | None) -> None:
        if not self.enabled or self._bar is None:
            return
        self._bar.n = step
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if tokens_per_s:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def close(self) -> Path | None:
        """Close the files and the bar; draw ``loss.png``. Returns the PNG path (None if not drawn)."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
            return plot_loss_curve(self.out_dir / METRICS_FILE, self.out_dir / PLOT_FILE, unigram_loss=self.unigram_loss)
        return None

    def _write(self, obj: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(obj) + "\n")
            self._jsonl.flush()


def read_metrics(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "eval": [...]}`` records of a ``metrics.jsonl``, by step, last record per step.

    A last line without its newline that is not JSON is the record a kill cut short: it is skipped (and
    :func:`repair_metrics` removes it before a resumed run appends). A bad line anywhere else is damage,
    not a kill: DataError naming the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read: {e}") from None
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    by_split: dict[str, dict[int, dict[str, Any]]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a kill mid-write
                continue
            raise DataError(f"{path}, line {number}, is not JSON: {line[:80]!r}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {number}: {line[:80]!r} must be a JSON object")
        if "split" in obj and (not isinstance(obj["split"], str) or type(obj.get("step")) is not int):
            raise DataError(f"{path}, line {number}: {line[:80]!r} must have a split name and an integer step")
        if "split" in obj:
            by_split.setdefault(obj["split"], {})[obj["step"]] = obj
    return {split: [records[s] for s in sorted(records)] for split, records in by_split.items()}


def repair_metrics(path: str | Path) -> bool:
    """Before appending to ``path``: cut a last line a kill left without its newline (or end a whole one
    with its newline), so new records start on a line of their own. Returns whether the file changed."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return False
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            f.truncate(start)  # the torn record: that step's metrics are written again on resume
        else:
            f.write(b"\n")
    return True


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, *, unigram_loss: float | None = None) -> Path | None:
    """:func:`loss_figure` of ``metrics_path`` as a PNG; None when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    fig = loss_figure(read_metrics(metrics_path), unigram_loss=unigram_loss)
    fig.savefig(str(png_path))
    return Path(png_path)


def loss_figure(records: dict[str, list[dict[str, Any]]], *, unigram_loss: float | None = None):
    """Training (and evaluation) loss against step (``records`` as :func:`read_metrics` returns them), with the
    unigram baseline as a labelled horizontal line when it is known: a ``matplotlib.figure.Figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in records.get(split, []) if "loss" in r]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, style, label=f"{split} loss", markersize=3)
    if unigram_loss is not None:
        ax.axhline(unigram_loss, color="gray", ls="--", lw=1, label=f"unigram baseline {unigram_loss:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return fig
