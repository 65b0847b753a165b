"""The static HTML report of the labs: an index of every claim and one page per lab.

Input: the labs' result folders as ``archlab lab ... --out DIR`` writes them, ``DIR/NAME/result.json`` (the
:class:`~archlab.labs.LabReport` fields) and ``DIR/NAME/plot.png``; any other PNG in a lab's folder (or its
``attention/`` subfolder, e.g. maps written by ``archlab attention``) is shown on its page as an attention map.

Output, one flat folder (replaced atomically)::

    index.html          every registered claim: lab, claim, source, verdict, a thumbnail of its plot ("not run"
                        for a lab without a result folder), and any result of a lab no longer registered
    lab-NAME.html       the claim, its source, the verdict, the plot, the table, the criterion, the finding, the
                        notes and the lab's attention maps; links to the index and the neighbouring labs
    NAME-plot.png, NAME-thumb.png, NAME-map-K.png   the images, copied (thumbnails made here)

Nothing is fetched at view time (styles inline, images local) and every text from a result file is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archlab.errors import ConfigError, DataError
from archlab.interop.io import check_not_under_file

MARKER = "<!-- archlab report -->"  # the first line of index.html: --out may replace a folder holding it
THUMB_WIDTH = 240
FIELDS = ("lab", "claim", "source", "verdict", "criterion", "finding", "columns", "rows")
VERDICT_CLASS = {"supported": "ok", "not supported": "no", "undecided": "und", "not run": "none"}

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
a { color: #0b5cad; } .muted { color: #666; font-size: .9em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { display: inline-block; padding: .1em .6em; border-radius: 1em; font-weight: 600; font-size: .85em;
           white-space: nowrap; }
.ok { background: #d8f3dc; color: #1b5e20; } .no { background: #ffe0e0; color: #8b0000; }
.und { background: #fff3cd; color: #7a5b00; } .none { background: #eee; color: #555; }
img.plot { max-width: 100%; border: 1px solid #eee; } img.thumb { width: 160px; border: 1px solid #eee; }
img.map { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
.claim { font-size: 1.08em; border-left: 4px solid #0b5cad; padding: .3em .9em; background: #f7f9fc; }
nav { margin: .5em 0 1em; } nav a { margin-right: 1em; }
.summary span { margin-right: 1em; }
"""


@dataclass
class LabEntry:
    """One claim of the report: its registered identity and, when it was run, its result and images."""

    name: str
    claim: str
    source: str
    result: dict[str, Any] | None = None
    plot: Path | None = None
    maps: list[Path] = field(default_factory=list)
    registered: bool = True

    @property
    def verdict(self) -> str:
        return "not run" if self.result is None else str(self.result["verdict"])

    @property
    def quick(self) -> bool:
        return self.result is not None and bool(self.result.get("quick"))

    @property
    def page(self) -> str:
        return f"lab-{self.name}.html"


def read_result(path: Path) -> dict[str, Any]:
    """A lab's ``result.json``, checked: DataError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable lab result ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a lab result is a JSON object, got {type(data).__name__}")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise DataError(f"{path}: missing field(s) {', '.join(missing)} (written by `archlab lab NAME --out DIR`)")
    if data["lab"] != path.parent.name:
        raise DataError(f"{path}: holds lab {data['lab']!r} but lies in the folder of {path.parent.name!r}")
    for key in ("lab", "verdict"):
        if not isinstance(data[key], str):
            raise DataError(f"{path}: {key} must be a string, got {json.dumps(data[key])[:60]}")
    if not isinstance(data["columns"], list):
        raise DataError(f"{path}: columns must be a list of column names, got {json.dumps(data['columns'])[:60]}")
    if data["verdict"] not in VERDICT_CLASS or data["verdict"] == "not run":
        raise DataError(f"{path}: verdict {data['verdict']!r} is not one of supported, not supported, undecided")
    if not isinstance(data["rows"], list) or any(not isinstance(r, list) or len(r) != len(data["columns"])
                                                 for r in data["rows"]):  # fmt: skip
        raise DataError(f"{path}: every row must be a list of {len(data['columns'])} cells (one per column)")
    return data


def collect(labs_dir: str | Path) -> list[LabEntry]:
    """Every registered lab (in name order) with its result from ``labs_dir`` if it has one, then the results of labs
    that are not registered (an older run's)."""
    from archlab.labs import list_labs

    labs_dir = Path(labs_dir)
    if not labs_dir.is_dir():
        raise ConfigError(f"--labs {str(labs_dir)!r} is not a folder (run `archlab lab all --out {labs_dir}` first)")
    entries = {lab.name: LabEntry(lab.name, lab.claim, lab.source) for lab in list_labs()}
    for result_file in sorted(labs_dir.glob("*/result.json")):
        data = read_result(result_file)
        name = data["lab"]
        entry = entries.setdefault(name, LabEntry(name, str(data["claim"]), str(data["source"]), registered=False))
        entry.result = data
        folder = result_file.parent
        plot = folder / "plot.png"
        entry.plot = plot if plot.is_file() else None
        images = [*folder.glob("*.png"), *folder.glob("attention/*.png")]
        entry.maps = sorted(p for p in images if p != plot and p.is_file())  # a folder named x.png is not a map
    return sorted(entries.values(), key=lambda e: (not e.registered, e.name))


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def cell(value: Any) -> str:
    """A table cell as the CLI prints it (4 significant digits), right-aligned when a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td>{esc(value)}</td>"
    if isinstance(value, float):
        text = f"{value:.4g}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"
    else:
        text = f"{value:,}"
    return f'<td class="num">{esc(text)}</td>'


def run_kind(result: dict[str, Any]) -> str:
    return "quick" if result.get("quick") else "full"


def badge(verdict: str, quick: bool = False) -> str:
    """The verdict's coloured label; a quick run that cannot decide reads "undecided (quick)"."""
    from archlab.labs import verdict_label

    return f'<span class="verdict {VERDICT_CLASS.get(verdict, "none")}">{esc(verdict_label(verdict, quick))}</span>'


def page(title: str, body: str) -> str:
    return (f"{MARKER}\n<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<link rel=\"icon\" href=\"data:,\"><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")  # fmt: skip


def index_html(entries: list[LabEntry], labs_dir: Path) -> str:
    counts = {v: sum(e.verdict == v for e in entries) for v in VERDICT_CLASS}
    summary = "".join(f"<span>{badge(v)} {n}</span>" for v, n in counts.items() if n)
    rows = []
    for e in entries:
        thumb = (f'<a href="{esc(e.page)}"><img class="thumb" src="{esc(e.name)}-thumb.png" '
                 f'alt="plot of {esc(e.name)}"></a>' if e.plot is not None else "")  # fmt: skip
        mode = "" if e.result is None else f'<div class="muted">{run_kind(e.result)} run</div>'
        gone = "" if e.registered else ' <span class="muted">(no longer registered)</span>'
        rows.append(f'<tr><td><a href="{esc(e.page)}">{esc(e.name)}</a>{gone}</td><td>{esc(e.claim)}</td>'
                    f"<td>{esc(e.source)}</td><td>{badge(e.verdict, e.quick)}{mode}</td><td>{thumb}</td></tr>")  # fmt: skip
    body = (
        "<h1>archlab: the lessons' claims, tested</h1>"
        f'<p class="muted">{len(entries)} claims; results read from <code>{esc(labs_dir)}</code>. Each lab states its '
        "criterion in code before it runs and computes its verdict from the numbers it measured.</p>"
        f'<p class="summary">{summary}</p>'
        "<table><thead><tr><th>lab</th><th>claim</th><th>source</th><th>verdict</th><th>plot</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return page("archlab labs report", body)


def lab_html(entry: LabEntry, previous: LabEntry | None, following: LabEntry | None) -> str:
    nav = ['<a href="index.html">&larr; all claims</a>']
    if previous is not None:
        nav.append(f'<a href="{esc(previous.page)}">previous: {esc(previous.name)}</a>')
    if following is not None:
        nav.append(f'<a href="{esc(following.page)}">next: {esc(following.name)}</a>')
    parts = [f"<nav>{''.join(nav)}</nav>", f"<h1>{esc(entry.name)} {badge(entry.verdict, entry.quick)}</h1>",
             f'<p class="claim">{esc(entry.claim)}</p>', f'<p class="muted">source: {esc(entry.source)}</p>']  # fmt: skip
    r = entry.result
    if r is None:
        parts.append(f"<p>Not run yet: <code>archlab lab {esc(entry.name)} --out DIR</code>, then "
                     "<code>archlab report --labs DIR</code>.</p>")  # fmt: skip
        return page(f"{entry.name}: not run", "\n".join(parts))
    seed, seconds = esc(r.get("seed", "?")), esc(r.get("seconds", "?"))
    parts.append(f'<p class="muted">{run_kind(r)} run, seed {seed}, {seconds} s</p>')
    if entry.plot is not None:
        parts.append(f'<img class="plot" src="{esc(entry.name)}-plot.png" alt="plot of {esc(entry.name)}">')
    head = "".join(f"<th>{esc(c)}</th>" for c in r["columns"])
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in r["rows"])
    parts += ["<h2>Numbers</h2>", f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
              "<h2>Criterion</h2>", f"<p>{esc(r['criterion'])}</p>", "<h2>Finding</h2>"]  # fmt: skip
    if r.get("undecided"):
        parts.append(f"<p><strong>Undecided:</strong> {esc(r['undecided'])}</p>")
    parts.append(f"<p>{esc(r['finding'])}</p>")
    if r.get("notes"):
        parts += ["<h2>Notes</h2>", f"<p>{esc(r['notes'])}</p>"]
    if entry.maps:
        parts.append("<h2>Attention maps</h2>")
        parts += [f'<figure><img class="map" src="{esc(entry.name)}-map-{k}.png" alt="{esc(p.stem)}">'
                  f"<figcaption class=\"muted\">{esc(p.stem)}</figcaption></figure>"
                  for k, p in enumerate(entry.maps)]  # fmt: skip
    return page(f"{entry.name}: {entry.verdict}", "\n".join(parts))


def thumbnail(src: Path, dst: Path, width: int = THUMB_WIDTH) -> None:
    """``src`` scaled to ``width`` pixels wide, at most ``4 width`` high (a tall strip keeps its aspect, narrower): a
    bounded image whatever ``src`` holds. DataError naming ``src`` when it is not an image PIL can read."""
    from PIL import Image

    try:
        with Image.open(src) as image:
            image.load()
            w, h = width, max(1, round(image.height * width / image.width))
            if h > 4 * width:
                w, h = max(1, round(image.width * 4 * width / image.height)), 4 * width
            image.convert("RGB").resize((w, h), Image.LANCZOS).save(dst, optimize=True)
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"{src}: not a readable plot image ({e})") from None


def check_out(out: Path) -> None:
    """ConfigError unless ``out`` is new, empty, or a report written here before (it is replaced whole)."""
    check_not_under_file(out, "--out", "a folder (new, empty, or an earlier report)")
    if out.is_dir() and any(out.iterdir()):
        index = out / "index.html"
        if not index.is_file() or not index.read_text(encoding="utf-8", errors="replace").startswith(MARKER):
            raise ConfigError(f"--out {str(out)!r} holds other files; the report replaces its folder whole, so give "
                              "a new or empty folder (or an earlier report's)")  # fmt: skip


def build_report(labs_dir: str | Path = "runs/labs", out: str | Path = "runs/report") -> Path:
    """Write the report of the results in ``labs_dir`` to ``out`` (replaced atomically); returns ``out/index.html``."""
    from archlab.interop.io import atomic_dir

    out = Path(out)
    check_out(out)
    entries = collect(labs_dir)
    with atomic_dir(out) as tmp:
        for i, entry in enumerate(entries):
            if entry.plot is not None:
                shutil.copyfile(entry.plot, tmp / f"{entry.name}-plot.png")
                thumbnail(entry.plot, tmp / f"{entry.name}-thumb.png")
            for k, path in enumerate(entry.maps):
                shutil.copyfile(path, tmp / f"{entry.name}-map-{k}.png")
            previous = entries[i - 1] if i > 0 else None
            following = entries[i + 1] if i + 1 < len(entries) else None
            (tmp / entry.page).write_text(lab_html(entry, previous, following), encoding="utf-8")
        (tmp / "index.html").write_text(index_html(entries, Path(labs_dir)), encoding="utf-8")
    return out / "index.html"
