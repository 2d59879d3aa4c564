"""A browsable static site of the workbook: one page per executed notebook, a landing page, a leaderboard.

``build_site`` writes, into one folder:

- ``NN_name.html`` per executed notebook (nbconvert's lab template), with a navigation bar: Home, Leaderboard,
  the previous and next notebook, and a list of all notebooks;
- ``index.html``: the workbook map (each notebook's number, title, one-line description, family, how its run went)
  and each notebook's key results from ``results/<name>.json``;
- ``leaderboard.html``: the benchmark's Markdown leaderboard and reporting checklist, read from its SQLite store
  (never trained or completed here), or a page naming the command that builds the store.

Why nbconvert pages and not Jupyter Book 1.x: nbconvert is already a dependency, it builds the site offline in
seconds, and its pages are exactly the executed notebooks. Jupyter Book 1.x would add a large Sphinx stack with
older pins and a second build of every page.

The pages work offline (opened as files or served by ``python -m http.server``): nbconvert's MathJax, require.js,
mermaid and widget scripts, which load from CDNs, are left out (no notebook writes LaTeX math; a ``$...$`` would
show as typed), plots are the base64 images the notebooks carry, and images a Markdown cell references are
embedded. The notebook list, titles and descriptions come from the notebook files, so a new notebook joins the
site by existing.
"""

from __future__ import annotations

import html
import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import nbformat

from . import notebooks as nbtools
from ._io import as_path, atomic_write_text, reading
from ._validate import check_type
from .results import project_root

NOTEBOOK_NAME = re.compile(r"^(\d\d)_\w+$")
HOME, LEADERBOARD = "index.html", "leaderboard.html"
# Offline pages: no CDN scripts (MathJax, require.js, mermaid, widgets), the navigation bar after <main>.
_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block html_head_js %}{% endblock html_head_js %}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{% block html_head_js_mathjax %}{% endblock html_head_js_mathjax %}
{% block html_head_js_mermaidjs %}{% endblock html_head_js_mermaidjs %}
{% block extra_css %}<link rel="icon" href="data:,"><style>{{ resources.site_css }}</style>{% endblock extra_css %}
{% block body_header %}{{ super() }}{{ resources.site_nav }}{% endblock body_header %}
"""
_CSS = """
.site-nav{position:sticky;top:0;z-index:100;display:flex;flex-wrap:wrap;gap:.3em 1.2em;align-items:center;
 padding:.5em 1em;margin:0 0 1em;background:#f5f7fa;border-bottom:1px solid #d0d7de;
 font:14px/1.4 system-ui,sans-serif}
.site-nav a{color:#0550ae;text-decoration:none}.site-nav a:hover{text-decoration:underline}
.site-nav .site-home{font-weight:600}.site-nav details{position:relative}
.site-nav summary{cursor:pointer;color:#0550ae}
.site-nav details ol{position:absolute;right:0;top:1.6em;margin:0;padding:.5em 1em .5em 2.5em;background:#fff;
 border:1px solid #d0d7de;box-shadow:0 4px 12px rgba(0,0,0,.15);max-height:70vh;overflow:auto;min-width:28em}
.site-nav details li{margin:.2em 0}
"""
_PAGE_CSS = """
body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#1f2328}main{margin:0 2em 2em}
table{border-collapse:collapse;margin:.5em 0 1.5em;display:block;overflow-x:auto;font-size:14px}
td,th{border:1px solid #d0d7de;padding:.35em .6em;vertical-align:top;text-align:left}th{background:#f5f7fa}
td.num{white-space:nowrap}pre{white-space:pre-wrap;background:#fff5f5;padding:.5em}code{font-size:90%}
.muted{color:#59636e}ul.results{margin:0;padding-left:1.1em}
"""


@dataclass(frozen=True)
class Status:
    """How one notebook's run went: ``ok``, its wall time in seconds (None: unknown) and the error's last lines."""

    ok: bool
    seconds: float | None = None
    error: str = ""


@dataclass(frozen=True)
class Entry:
    """One notebook of the site: file stem, number, title, one-line description and family (may be '')."""

    name: str
    number: str
    title: str
    description: str
    family: str = ""

    @property
    def page(self) -> str:
        """The file name of its page."""
        return f"{self.name}.html"

    @property
    def label(self) -> str:
        """Its number and title, as the navigation shows it."""
        return f"{self.number} · {self.title}"


# ----------------------------------------------------------------------------------------------------------
# Reading the notebooks: titles, descriptions, families
# ----------------------------------------------------------------------------------------------------------

def read_notebook(path: Path) -> nbformat.NotebookNode:
    """The notebook at ``path``; FileFormatError (a ValueError) naming the file if it is not a notebook."""
    with reading(path, "Jupyter notebook", errors=(nbformat.ValidationError,)):
        return nbtools.read(path)


def entry(name: str, nb: nbformat.NotebookNode, families: Mapping[str, str] | None = None) -> Entry:
    """The site's view of notebook ``name``: title from its first Markdown heading, description from the first
    sentence of the paragraph after it, family from ``families``."""
    number = name[:2]
    cells = [c.source for c in nb.cells if c.cell_type == "markdown"]
    text = "\n\n".join(cells)
    heading = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)
    title = heading.group(1) if heading else name
    title = re.sub(rf"^{number}\s*[·.:\-–]\s*", "", title)
    after = text[heading.end():] if heading else text
    return Entry(name, number, _plain(title), _plain(first_sentence(_first_paragraph(after))),
                 (families or {}).get(name, ""))


def _first_paragraph(markdown: str) -> str:
    for block in re.split(r"\n\s*\n", markdown):
        block = block.strip()
        if block and not re.match(r"^(#|[-*+] |\d+\. |\||```|<|>)", block):
            return " ".join(block.split())
    return ""


_ABBREVIATIONS = ("e.g.", "i.e.", "et al.", "vs.", "cf.", "approx.", "Fig.")


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (a period inside e.g./et al./vs. does not end one)."""
    for match in re.finditer(r"[.!?](?=\s+[\"'*(\[A-Z0-9])", text):
        head = text[:match.end()]
        if not head.endswith(_ABBREVIATIONS):
            return head
    return text


def _plain(markdown: str) -> str:
    """Inline Markdown as plain text: links keep their text, emphasis and code marks go."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    return re.sub(r"(\*\*|__|\*|`)", "", text).strip()


def families(notebooks: Sequence[nbformat.NotebookNode]) -> dict[str, str]:
    """Notebook name -> the family it covers, read from a Markdown table with a 'family' and a 'notebook' column
    and, in the same cell, bullets ``- **idea** (`NN_name`, ...)`` (notebook 00's map of the workbook)."""
    found: dict[str, list[str]] = {}
    for nb in notebooks:
        for cell in (c for c in nb.cells if c.cell_type == "markdown"):
            rows = _family_rows(cell.source)
            bullets = re.findall(r"^\s*[-*+]\s+\*\*([^*]+)\*\*\s*\(([^)]*)\)", cell.source, flags=re.M) if rows else []
            rows += [(idea.lower(), re.findall(r"\d\d_\w+", names)) for idea, names in bullets]
            for family, names in rows:
                for name in names:
                    found.setdefault(name, []).append(family)
    return {name: "; ".join(dict.fromkeys(fams)) for name, fams in found.items()}


def _family_rows(markdown: str) -> list[tuple[str, list[str]]]:
    rows, header = [], None
    for line in markdown.splitlines() + [""]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            header = None
        elif header is None:
            header = [c.lower() for c in cells]
        elif "family" in header and "notebook" in header and not set(line) <= set("|-: "):
            family = re.sub(r"^\d+\.\s*", "", _plain(cells[header.index("family")]))
            rows.append((family, re.findall(r"\d\d_\w+", cells[header.index("notebook")])))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Pages
# ----------------------------------------------------------------------------------------------------------

def nav_bar(entries: Sequence[Entry], current: str | None = None) -> str:
    """The navigation bar: Home, Leaderboard, the notebooks before and after ``current``, all notebooks."""
    names = [e.name for e in entries]
    links = [f'<a class="site-home" href="{HOME}">Home</a>', f'<a href="{LEADERBOARD}">Leaderboard</a>']
    if current in names:
        i = names.index(current)
        if i > 0:
            links.append(f'<a href="{entries[i - 1].page}" rel="prev">← {html.escape(entries[i - 1].label)}</a>')
        if i + 1 < len(entries):
            links.append(f'<a href="{entries[i + 1].page}" rel="next">{html.escape(entries[i + 1].label)} →</a>')
    items = "".join(f'<li><a href="{e.page}">{html.escape(e.label)}</a></li>' for e in entries)
    links.append(f"<details><summary>All notebooks ({len(entries)})</summary><ol>{items}</ol></details>")
    return f'<nav class="site-nav" aria-label="workbook">{"".join(links)}</nav>'


def _exporter() -> Any:
    """nbconvert's HTML exporter with the site's template; its notes on images without alt text (every plot) are
    not shown."""
    import logging

    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    log = logging.getLogger("survey_lib.site.nbconvert")
    log.setLevel(logging.ERROR)
    return HTMLExporter(extra_loaders=[DictLoader({"site.html.j2": _TEMPLATE})], template_file="site.html.j2",
                        embed_images=True, log=log)


def notebook_page(nb: nbformat.NotebookNode, item: Entry, entries: Sequence[Entry], exporter: Any = None,
                  folder: Path | None = None) -> str:
    """The HTML page of notebook ``nb`` (whose Markdown images are relative to ``folder``): nbconvert's lab page
    without CDN scripts, with the navigation bar, and links to notebooks of the site pointing at their pages."""
    nb = nbformat.from_dict(nb)
    nb.metadata["title"] = item.label
    resources = {"site_nav": nav_bar(entries, item.name), "site_css": _CSS,
                 "metadata": {"name": item.name, "path": str(folder or "")}}
    body, _ = (exporter or _exporter()).from_notebook_node(nb, resources=resources)
    pages = {e.name for e in entries}
    return re.sub(r'href="(\d\d_\w+)\.ipynb(#[^"]*)?"',
                  lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"' if m.group(1) in pages else m.group(0), body)


def page(title: str, body: str, entries: Sequence[Entry]) -> str:
    """A standalone page of the site (landing page, leaderboard) with the navigation bar."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1.0"><link rel="icon" href="data:,">'
            f"<title>{html.escape(title)}</title><style>{_CSS}{_PAGE_CSS}</style></head>"
            f"<body>{nav_bar(entries)}<main>{body}</main></body></html>\n")


def _status(nb: nbformat.NotebookNode | None, status: Status | None) -> Status | None:
    """``status``, else what papermill recorded in an executed notebook, else None (e.g. committed outputs)."""
    if status is not None or nb is None or "papermill" not in nb.metadata:
        return status
    run = nb.metadata["papermill"]
    return Status(not run.get("exception"), run.get("duration"))


def _status_cell(status: Status | None) -> str:
    if status is None:
        return '<span class="muted">no run record</span>'
    took = "" if status.seconds is None else f" in {status.seconds:.1f} s"
    if status.ok:
        return f"ok{took}"
    return f"<b>FAILED</b>{took}" + (f"<pre>{html.escape(status.error)}</pre>" if status.error else "")


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def results_cell(data: Mapping[str, Any]) -> str:
    """A notebook's key results (``nbtools.key_results``) as an HTML list, with the machine they came from."""
    rows = [f"<li>{html.escape(k)} = {_value(v)} {html.escape(u)} <i>({html.escape(kind)})</i></li>"
            for k, v, u, kind in nbtools.key_results(data)]
    if not rows:
        return '<span class="muted">no results file</span>' if not data.get("results") else ""
    host = data.get("host", {}).get("cpu_model")
    where = f'<span class="muted">on {html.escape(host)}</span>' if host else ""
    return f'<ul class="results">{"".join(rows)}</ul>{where}'


def load_results(folder: Path | None, name: str) -> dict[str, Any]:
    """The results file ``<folder>/<name>.json`` ({} if there is none)."""
    path = folder / f"{name}.json" if folder else None
    if path is None or not path.is_file():
        return {}
    with reading(path, "results file"):
        return json.loads(path.read_text(encoding="utf-8"))


def landing_page(entries: Sequence[Entry], statuses: Mapping[str, Status | None], results: Path | None,
                 profile: str | None = None) -> str:
    """``index.html``: the workbook map with each notebook's run and key results."""
    linked = {e.name for e in entries}
    known = {e.name: e for e in entries}
    rows = []
    for name in sorted(set(known) | set(statuses)):
        e = known.get(name) or Entry(name, name[:2], name, "")
        title = f'<a href="{e.page}">{html.escape(e.title)}</a>' if name in linked else html.escape(e.title)
        cells = [title, html.escape(e.description), html.escape(e.family), _status_cell(statuses.get(name)),
                 results_cell(load_results(results, name))]
        rows.append(f'<tr id="nb-{e.number}"><td class="num">{e.number}</td>'
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    where = f"profile <b>{html.escape(profile)}</b>; " if profile else ""
    body = ("<h1>Compression and acceleration workbook</h1>"
            f"<p>{where}{len(entries)} notebook page(s); the benchmark's <a href=\"{LEADERBOARD}\">leaderboard</a>. "
            "Every figure says whether it was <i>counted</i>, <i>measured</i> or <i>estimated</i>.</p>"
            '<h2 id="map">The workbook map</h2><table><tr><th>#</th><th>notebook</th><th>what it covers</th>'
            "<th>family</th><th>run</th><th>key results</th></tr>" + "".join(rows) + "</table>")
    return page("survey_lib workbook", body, entries)


# ----------------------------------------------------------------------------------------------------------
# Leaderboard (reads the benchmark store; never runs anything)
# ----------------------------------------------------------------------------------------------------------

def leaderboard_markdown(spec: Any, table: Any) -> str:
    """The Markdown leaderboard of ``spec``'s runs in ``table`` (a ResultsStore.table()), then the reporting
    checklist generated from them (what ``survey-lib bench --export md`` writes)."""
    from .bench import report
    from .bench.guidelines import checklist_markdown, guidelines

    return (f"# Benchmark {spec.name!r}\n\n" + report.leaderboard(report.summary(table), spec.hardware)
            + "\n## Guidelines from these results\n\n" + checklist_markdown(guidelines(table, spec.hardware)) + "\n")


def markdown_html(text: str) -> str:
    """Markdown (tables, task lists) as HTML; raw HTML in ``text`` is escaped, not passed through."""
    import mistune

    return mistune.create_markdown(escape=True, plugins=["table", "task_lists"])(text)


_LEADERBOARD_TITLE = "<h1>Benchmark leaderboard</h1>"


def leaderboard_body(spec_path: Path, store: Path | None) -> str:
    """The leaderboard page's content: the store's runs of the spec at ``spec_path``, or why there are none."""
    from .bench.spec import load_spec

    try:
        spec = load_spec(spec_path)
    except (FileNotFoundError, ValueError) as err:
        return f"{_LEADERBOARD_TITLE}<p>The benchmark spec could not be read: {html.escape(str(err))}</p>"
    if store is None or not Path(store).is_file():
        return _no_store(spec, store)
    try:
        held, table = _stored(spec, store)
    except (ValueError, sqlite3.Error) as err:   # StoreError: corrupted or foreign file, left untouched
        return f"{_LEADERBOARD_TITLE}<p>The store could not be read: {html.escape(str(err))}</p>"
    note = _store_note(spec, store, held)
    if not held:
        return _LEADERBOARD_TITLE + note
    try:
        markdown = leaderboard_markdown(spec, table)
    except (ValueError, KeyError) as err:   # odd data (e.g. runs of several code versions): say so, keep the site
        return f"{_LEADERBOARD_TITLE}{note}<p>The leaderboard could not be made: {html.escape(repr(err))}</p>"
    return markdown_html(markdown).replace("</h1>", f"</h1>{note}", 1)


def _no_store(spec: Any, store: Path | None) -> str:
    from .bench.runner import build_command

    where = f"There is no benchmark store at <code>{html.escape(str(store))}</code> yet." if store else \
        "No benchmark store was given."
    command = html.escape(build_command(spec, store or "STORE"))
    return (f"{_LEADERBOARD_TITLE}<p>{where} Build it with <code>{command}</code> (notebooks 08, 09 and 10 fill the "
            "default one when they run), then build this site again.</p>")


def _stored(spec: Any, store: Path) -> tuple[int, Any]:
    """How many of ``spec``'s runs ``store`` holds, and their table; the file is only read."""
    from .bench import ResultsStore

    keys = {r.key for r in spec.runs()}
    with ResultsStore(store) as db:
        held = sorted(keys & db.keys())
        return len(held), db.table(held)


def _store_note(spec: Any, store: Path, held: int) -> str:
    from .bench.runner import build_command

    total = len(spec.runs())
    note = (f"<p>Read from <code>{html.escape(str(store))}</code>: {held} of the {total} runs of spec "
            f"<code>{html.escape(spec.name)}</code> (<code>{html.escape(str(spec.source))}</code>), seeds "
            f"{', '.join(map(str, spec.seeds))}.")
    if held < total:
        note += f" Complete it with <code>{html.escape(build_command(spec, store))}</code>."
    return note + "</p>"


# ----------------------------------------------------------------------------------------------------------
# The site
# ----------------------------------------------------------------------------------------------------------

def default_spec() -> Path:
    """The default benchmark spec, ``<project>/data/bench/default.toml``."""
    return project_root() / "data" / "bench" / "default.toml"


def check_notebooks(notebooks: Any) -> list[Path]:
    """``notebooks`` as paths of executed ``NN_name.ipynb`` files, sorted by name; TypeError or ValueError naming
    the parameter for anything else (FileNotFoundError for a missing file)."""
    if isinstance(notebooks, (str, bytes)) or not isinstance(notebooks, Sequence):
        raise TypeError(f"notebooks must be a sequence of notebook paths (str or os.PathLike), got "
                        f"{type(notebooks).__name__}")
    paths = [as_path(p, f"notebooks[{i}]") for i, p in enumerate(notebooks)]
    for i, p in enumerate(paths):
        if p.suffix != ".ipynb" or not NOTEBOOK_NAME.match(p.stem):
            raise ValueError(f"notebooks[{i}]={str(p)!r} is not supported; accepted values: files named NN_name.ipynb")
        if not p.is_file():
            raise FileNotFoundError(f"notebooks[{i}]={str(p)!r}: no such file")
    stems = [p.stem for p in paths]
    if len(set(stems)) < len(stems):
        raise ValueError(f"notebooks holds two files named {next(s for s in stems if stems.count(s) > 1)}.ipynb; "
                         "accepted values: one file per notebook name")
    return sorted(paths, key=lambda p: p.stem)


def _check_statuses(statuses: Any) -> dict[str, Status]:
    if statuses is None:
        return {}
    check_type("statuses", statuses, Mapping, "a mapping of notebook name to site.Status")
    for name, status in statuses.items():
        if not isinstance(name, str) or not NOTEBOOK_NAME.match(name):
            raise ValueError(f"statuses key {name!r} is not supported; accepted values: notebook names NN_name")
        check_type(f"statuses[{name!r}]", status, Status, "a site.Status")
    return dict(statuses)


def build_site(notebooks: Sequence[str | Path], output: str | Path, *, statuses: Mapping[str, Status] | None = None,
               results: str | Path | None = None, store: str | Path | None = None, spec: str | Path | None = None,
               profile: str | None = None) -> Path:
    """Write the site into ``output`` and return its ``index.html``: a page per executed notebook, the landing
    page (``statuses`` of runs, else papermill's record, and key results from ``results/<name>.json``), and the
    leaderboard of ``spec`` (default: data/bench/default.toml) read from the SQLite ``store``."""
    paths = check_notebooks(notebooks)
    out = as_path(output, "output")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output={str(out)!r} is a file; accepted values: a folder (created if missing)")
    runs = _check_statuses(statuses)
    results_dir = None if results is None else as_path(results, "results")
    store_path = None if store is None else as_path(store, "store")
    spec_path = default_spec() if spec is None else as_path(spec, "spec")
    if profile is not None:
        check_type("profile", profile, str, "a str such as 'default' or None")
    nbs = {p.stem: read_notebook(p) for p in paths}
    fams = families(list(nbs.values()))
    entries = [entry(name, nb, fams) for name, nb in nbs.items()]
    exporter = _exporter()
    for item, path in zip(entries, paths):
        atomic_write_text(out / item.page, notebook_page(nbs[item.name], item, entries, exporter, path.parent))
    leaderboard = leaderboard_body(spec_path, store_path)
    atomic_write_text(out / LEADERBOARD, page("Benchmark leaderboard", leaderboard, entries))
    known = {name: _status(nbs.get(name), runs.get(name)) for name in set(nbs) | set(runs)}
    return atomic_write_text(out / HOME, landing_page(entries, known, results_dir, profile))


_EXTERNAL = re.compile(
    r"""<(?:script|link|img|iframe|source|embed)\b[^>]*?\b(?:src|href)\s*=\s*["']?((?:https?:)?//[^"'\s>]+)""", re.I)


def external_resources(page_html: str) -> list[str]:
    """URLs of scripts, stylesheets, images or frames that ``page_html`` would load from another host."""
    return _EXTERNAL.findall(page_html)
