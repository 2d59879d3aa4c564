"""The workbook's static site: fast checks of survey_lib.site on tiny synthetic notebooks, and a browser test
(marker ``browser``) that opens every page built from the committed notebooks in headless Chromium."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

import nbformat
import pytest

from survey_lib import cli, site
from survey_lib import notebooks as nbtools
from survey_lib.results import project_root

PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
MAP = ("## Map\n\n| family | what | notebook |\n|---|---|---|\n| 1. pruning | masks | `02_prune` |\n\n"
       "- **Honest benchmarking** (`03_bench`): same baseline")


def _notebook(path: Path, title: str, text: str, extra_md: str = "", papermill: dict | None = None) -> Path:
    nb = nbformat.v4.new_notebook()
    plot = nbformat.v4.new_code_cell("plot()")
    plot.outputs = [nbformat.v4.new_output("display_data", data={"image/png": PNG_1X1, "text/plain": "<Figure>"})]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\n{text}\n\n## Goals\n- learn"), plot]
    if extra_md:
        nb.cells.append(nbformat.v4.new_markdown_cell(extra_md))
    if papermill is not None:
        nb.metadata["papermill"] = papermill
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def workbook(tmp_path):
    """Three executed notebooks (01 with the family map; 02 links to 01's Goals), and a results folder for 01."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    paths = [
        _notebook(folder / "01_intro.ipynb", "01 · Intro to *costs*", "Models cost e.g. time, et al. say so. Second.", MAP),
        _notebook(folder / "02_prune.ipynb", "02 · Pruning", "Zeros save nothing.", "See [the goals](01_intro.ipynb#Goals)."),
        _notebook(folder / "03_bench.ipynb", "03 · Benchmark", "Compare fairly.",
                  papermill={"exception": None, "duration": 4.25}),
    ]
    results = tmp_path / "results"
    results.mkdir()
    (results / "01_intro.json").write_text(json.dumps({"notebook": "01_intro", "host": {"cpu_model": "Test CPU"}, "results": {
        "speedup": {"value": 3.14159, "kind": "measured", "unit": "x"}}}))
    return paths, results


def _build(workbook, out, **kw):
    paths, results = workbook
    return site.build_site(paths, out, results=results, store=out.parent / "no_store.sqlite", **kw)


def test_build_writes_every_page_with_navigation_and_no_external_resources(workbook, tmp_path):
    out = tmp_path / "site"
    index = _build(workbook, out, statuses={"02_prune": site.Status(True, 1.5), "04_gone": site.Status(False, 2.0, "boom")},
                   profile="default")
    assert index == out / "index.html"
    assert sorted(p.name for p in out.iterdir()) == ["01_intro.html", "02_prune.html", "03_bench.html", "index.html",
                                                     "leaderboard.html"]
    middle = (out / "02_prune.html").read_text()
    for link in ('href="index.html"', 'href="leaderboard.html"', 'href="01_intro.html" rel="prev"',
                 'href="03_bench.html" rel="next"', 'href="03_bench.html"'):
        assert link in middle
    assert 'href="01_intro.html#Goals"' in middle and "01_intro.ipynb" not in middle   # links between notebooks
    assert f"data:image/png;base64,{PNG_1X1}" in middle
    assert "<title>02 · Pruning</title>" in middle
    for page in out.iterdir():
        assert site.external_resources(page.read_text()) == [], page.name
        assert "cdnjs" not in page.read_text() and "require.js" not in page.read_text()


def test_landing_page_maps_the_workbook_from_the_notebooks(workbook, tmp_path):
    out = tmp_path / "site"
    _build(workbook, out, statuses={"02_prune": site.Status(True, 1.5), "04_gone": site.Status(False, 2.0, "boom")})
    index = (out / "index.html").read_text()
    assert '<a href="01_intro.html">Intro to costs</a>' in index          # title: first heading, number stripped
    assert "Models cost e.g. time, et al. say so." in index and "Second" not in index   # first sentence
    assert "<td>pruning</td>" in index and "<td>honest benchmarking</td>" in index   # families from 01's map
    assert "ok in 1.5 s" in index and "ok in 4.2 s" in index and "no run record" in index
    assert "FAILED" in index and "boom" in index and "04_gone.html" not in index   # failed before writing a notebook
    assert "speedup = 3.142 x <i>(measured)</i>" in index and "Test CPU" in index


def test_leaderboard_without_a_store_names_the_command_and_creates_nothing(workbook, tmp_path):
    out = tmp_path / "site"
    _build(workbook, out)
    page = (out / "leaderboard.html").read_text()
    assert "no benchmark store at" in page and "survey-lib bench" in page
    assert not (tmp_path / "no_store.sqlite").exists()


def test_leaderboard_of_a_store_without_the_specs_runs_only_reads_it(tmp_path):
    from survey_lib.bench import ResultsStore

    path = tmp_path / "empty.sqlite"
    ResultsStore(path).close()
    before = path.read_bytes()
    body = site.leaderboard_body(site.default_spec(), path)
    assert "0 of the" in body and "Complete it with" in body and "survey-lib bench" in body
    assert path.read_bytes() == before


def test_markdown_html_renders_tables_and_escapes_raw_html():
    out = site.markdown_html("| a | b |\n|---|---|\n| 1 | <script>x</script> |\n")
    assert "<table>" in out and "<script>" not in out and "&lt;script&gt;" in out


def test_external_resources_finds_what_nbconverts_default_page_loads(workbook):
    from nbconvert import HTMLExporter

    default, _ = HTMLExporter().from_filename(str(workbook[0][0]))
    assert any("cdnjs" in url for url in site.external_resources(default))
    assert site.external_resources('<script src="//cdn.x/y.js"></script><a href="https://x.org">ok</a>') == ["//cdn.x/y.js"]


def test_first_sentence_and_entry():
    assert site.first_sentence("Hinton et al. showed it. Then more.") == "Hinton et al. showed it."
    assert site.first_sentence("No period here") == "No period here"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("intro\n\n# 07 · Search\n\n- a list\n\nThe text. B")])
    e = site.entry("07_search", nb)
    assert (e.number, e.title, e.description, e.page, e.label) == ("07", "Search", "The text.", "07_search.html", "07 · Search")


@pytest.mark.parametrize("notebooks,error,words", [
    ("01_a.ipynb", TypeError, "notebooks must be a sequence"),
    ([3], TypeError, "notebooks[0]"),
    (["x/readme.txt"], ValueError, "NN_name.ipynb"),
    (["x/intro.ipynb"], ValueError, "NN_name.ipynb"),
    (["x/01_missing.ipynb"], FileNotFoundError, "notebooks[0]"),
])
def test_bad_notebooks_argument_is_named(notebooks, error, words, tmp_path):
    with pytest.raises(error) as exc:
        site.build_site(notebooks, tmp_path / "site")
    assert words in str(exc.value)


def test_bad_keyword_arguments_are_named(workbook, tmp_path):
    paths, _ = workbook
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(paths[0], twin / paths[0].name)
    cases = [
        (dict(notebooks=[paths[0], twin / paths[0].name]), ValueError, "two files named 01_intro.ipynb"),
        (dict(output=paths[0]), ValueError, "output="),
        (dict(output=3), TypeError, "output must be"),
        (dict(statuses={"intro": site.Status(True)}), ValueError, "statuses key 'intro'"),
        (dict(statuses={"01_intro": "ok"}), TypeError, "statuses['01_intro']"),
        (dict(statuses=[("01_intro", True)]), TypeError, "statuses must be"),
        (dict(profile=3), TypeError, "profile must be"),
        (dict(store=1.5), TypeError, "store must be"),
    ]
    for kw, error, words in cases:
        args = {"notebooks": paths, "output": tmp_path / "site", **kw}
        with pytest.raises(error) as exc:
            site.build_site(args.pop("notebooks"), args.pop("output"), **args)
        assert words in str(exc.value), kw


def test_a_file_that_is_not_a_notebook_is_named(tmp_path):
    bad = tmp_path / "01_bad.ipynb"
    bad.write_text("{not json")
    with pytest.raises(ValueError) as exc:
        site.build_site([bad], tmp_path / "site")
    assert "01_bad.ipynb" in str(exc.value) and "not a valid Jupyter notebook" in str(exc.value)


def test_pages_are_written_atomically(workbook, tmp_path, monkeypatch):
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("old index")
    real, calls = site.notebook_page, []

    def fail_on_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("exporter broke")
        return real(*args, **kw)

    monkeypatch.setattr(site, "notebook_page", fail_on_second)
    with pytest.raises(RuntimeError, match="exporter broke"):
        _build(workbook, out)
    assert (out / "index.html").read_text() == "old index"   # the old site stays whole
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(site, "notebook_page", real)
    _build(workbook, out)
    assert "Intro to costs" in (out / "index.html").read_text() and not list(out.glob(".*.tmp"))


def test_cli_site_builds_from_executed_notebooks_without_running_them(workbook, tmp_path, capsys):
    paths, results = workbook
    out = tmp_path / "out"
    assert cli.main(["site", "--notebooks", str(paths[0].parent), "--output", str(out), "--results", str(results),
                     "--store", str(tmp_path / "none.sqlite")]) == 0
    assert (out / "02_prune.html").exists() and "Intro to costs" in (out / "index.html").read_text()
    assert str(out / "index.html") in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["site", "--notebooks", str(empty), "--output", str(out)]) == 2
    assert "no notebooks" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The browser test: every page of the site built from the committed notebooks, in headless Chromium
# ----------------------------------------------------------------------------------------------------------

# Root, closed network: no sandbox, GPU, QUIC or background fetches. Playwright adds --headless (headless=True) and
# --user-data-dir (the persistent context's fresh, empty folder).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# What each page reports: element ids (anchors), link targets, and the images of notebook outputs as laid out.
PAGE_FACTS = """() => ({
  ids: [...document.querySelectorAll('[id]')].map(e => e.id).concat([...document.querySelectorAll('a[name]')].map(a => a.name)),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  images: [...document.querySelectorAll('.jp-OutputArea-output img')].map(img => {
    const r = img.getBoundingClientRect();
    return {src: img.getAttribute('src').slice(0, 30), width: r.width, height: r.height, natural: img.naturalWidth};
  }),
})"""


def _chromium() -> str:
    """Chromium's path, or skip (fail where SURVEY_LIB_REQUIRE_BROWSER=1) naming what is missing."""
    found = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    reason = None if found else ("no Chromium on PATH (`make browser` installs Debian's chromium where apt-get "
                                 "exists and we are root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the playwright package is missing: pip install -c constraints.txt -e '.[test]'"
    if reason and os.environ.get("SURVEY_LIB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SURVEY_LIB_REQUIRE_BROWSER=1 but {reason}")
    if reason:
        pytest.skip(reason)
    return found


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: ANN002 - http.server signature
        pass


@contextlib.contextmanager
def _serve(folder: Path):
    """``folder`` over HTTP on localhost (a thread); yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def _visit(page, url: str) -> tuple[list[str], dict]:
    """Open ``url``; the console errors and page errors it raised, and its PAGE_FACTS."""
    errors: list[str] = []
    on_console = lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None  # noqa: E731
    on_error = lambda e: errors.append(f"page error: {e}")  # noqa: E731
    page.on("console", on_console)
    page.on("pageerror", on_error)
    response = page.goto(url, wait_until="load")
    if response is None or not response.ok:
        errors.append(f"HTTP {response.status if response else 'no response'}")
    facts = page.evaluate(PAGE_FACTS)
    page.remove_listener("console", on_console)
    page.remove_listener("pageerror", on_error)
    return errors, facts


def _image_problems(images: list[dict]) -> list[str]:
    return [f"image {i} ({im['src']}...) rendered {im['width']}x{im['height']}, naturalWidth {im['natural']}"
            for i, im in enumerate(images) if not (im["width"] > 0 and im["height"] > 0 and im["natural"] > 0)]


def _link_problems(links: dict[str, list[str]], ids: dict[str, set[str]], base: str, folder: Path) -> list[str]:
    """Internal links (same host) whose page is missing, or whose #anchor is not an id of that page."""
    problems = []
    for source, hrefs in links.items():
        for href in hrefs:
            url = urllib.parse.urlsplit(href)
            if not href.startswith(base):
                continue   # another host (a citation) or mailto: never loaded by the page
            target = urllib.parse.unquote(url.path[1:]) or "index.html"
            if not (folder / target).is_file():
                problems.append(f"{source}: link {href} -> missing page {target}")
            elif url.fragment and not {url.fragment, urllib.parse.unquote(url.fragment)} & ids.get(target, set()):
                # as a browser looks: the fragment as written, then percent-decoded (nbconvert's heading ids are quoted)
                problems.append(f"{source}: link {href} -> no id {urllib.parse.unquote(url.fragment)!r} in {target}")
    return problems


def _browse(folder: Path, pages: list[str], chromium: str, profile: Path) -> tuple[list[str], int]:
    """Serve ``folder``, open each of ``pages`` in headless Chromium (a fresh profile); every problem found, and how
    many output images there were."""
    from playwright.sync_api import sync_playwright

    problems, ids, links, n_images, offsite = [], {}, {}, 0, []
    with _serve(folder) as base, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                      else (offsite.append(route.request.url), route.abort()))
        page = context.new_page()
        for name in pages:
            errors, facts = _visit(page, base + name)
            problems += [f"{name}: {e}" for e in errors] + [f"{name}: {p}" for p in _image_problems(facts["images"])]
            ids[name], links[name], n_images = set(facts["ids"]), facts["links"], n_images + len(facts["images"])
        context.close()
    problems += [f"request off localhost: {url}" for url in offsite]
    return problems + _link_problems(links, ids, base, folder), n_images


@pytest.mark.browser
def test_every_page_of_the_site_works_offline_in_chromium(tmp_path):
    """The site of the committed notebooks (with the benchmark store where one exists) in headless Chromium:
    no console or page errors, no request off localhost, every output image rendered, every internal link and
    anchor resolves."""
    chromium = _chromium()
    folder = tmp_path / "site"
    store = project_root() / "build" / "bench" / "default.sqlite"
    start = time.perf_counter()
    site.build_site(nbtools.list_notebooks(), folder, store=store, results=project_root() / "build" / "results")
    print(f"site built in {time.perf_counter() - start:.1f} s")
    pages = ["index.html", "leaderboard.html"] + sorted(p.name for p in folder.glob("[0-9][0-9]_*.html"))
    assert len(pages) == len(nbtools.list_notebooks()) + 2
    start = time.perf_counter()
    problems, n_images = _browse(folder, pages, chromium, tmp_path / "profile")
    print(f"{len(pages)} pages checked in Chromium in {time.perf_counter() - start:.1f} s")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])
    assert n_images > 0, "the committed notebooks carry plots: no output image was found"
    leaderboard = (folder / "leaderboard.html").read_text()
    assert ("<table>" in leaderboard) if store.is_file() else ("no benchmark store" in leaderboard)


@pytest.mark.browser
def test_the_browser_check_finds_broken_pages(tmp_path):
    """The checks above on a page with one of each fault: each is reported."""
    chromium = _chromium()
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "a.html").write_text(
        '<!DOCTYPE html><link rel="icon" href="data:,"><script>console.error("boom")</script>'
        '<script>throw new Error("thrown")</script>'
        '<div class="jp-OutputArea-output"><img src="data:image/png;base64,AAAA"></div>'
        f'<div class="jp-OutputArea-output"><img style="display:none" src="data:image/png;base64,{PNG_1X1}"></div>'
        '<img src="https://cdn.example.org/x.png"><a href="missing.html">m</a><a href="b.html#nope">n</a>'
        '<a href="b.html#yes">y</a><a href="https://example.org/paper">cited</a>')
    (folder / "b.html").write_text('<!DOCTYPE html><link rel="icon" href="data:,"><h1 id="yes">b</h1>')
    problems, n_images = _browse(folder, ["a.html", "b.html"], chromium, tmp_path / "profile")
    text = "\n".join(problems)
    for fault in ("console error: boom", "page error: thrown", "image 0", "image 1 ", "rendered 0x0",
                  "request off localhost: https://cdn.example.org/x.png", "missing page missing.html", "no id 'nope'"):
        assert fault in text, f"{fault!r} not reported in:\n{text}"
    assert "#yes" not in text and "example.org/paper" not in text and n_images == 2
