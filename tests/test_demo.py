"""The main job end to end on the tiny random model, and its report in a real browser."""

import json
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from emolens.cli import main


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--model", "tiny-random", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_demo_fine_tunes_analyses_every_checkpoint_and_writes_the_report(demo_out):
    results = demo_out / "results"
    steps = pd.read_csv(results / "steps.csv")
    run_steps = sorted(int(p.name.split("-")[1]) for p in (demo_out / "run").glob("checkpoint-*"))
    assert steps.step.tolist() == [0] + run_steps and len(run_steps) >= 2
    assert steps.eval_loss.iloc[1:].notna().all()
    for name in (
        "sensitivity.csv",
        "filtering.csv",
        "attribution.csv",
        "transfer.csv",
        "dla.csv",
        "label_audit.json",
        "manifest.json",
        "report.html",
    ):
        assert (results / name).stat().st_size > 0, name
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["failures"] == [] and manifest["run_dir"]
    html = (results / "report.html").read_text(encoding="utf-8")
    assert "Figure 2" in html and "喜び" in html and "<script src=" not in html


def test_report_rebuilds_from_disk(demo_out, capsys):
    report = demo_out / "results" / "report.html"
    report.unlink()
    assert main(["report", str(demo_out / "results")]) == 0
    assert report.exists() and str(report) in capsys.readouterr().out


def test_report_stays_under_its_size_budget(demo_out):
    """plotly.js once and packed, each figure's JSON rounded and packed: the tiny demo's
    report was 5.9 MB before (4.8 MB of it plotly.js, inline as text)."""
    assert (demo_out / "results" / "report.html").stat().st_size < 3_000_000


def _chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


def _browser_or_skip() -> str:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return browser


def _dump_dom(browser: str, page, tmp_path) -> subprocess.CompletedProcess:
    """The page's DOM after headless Chromium ran its scripts, with the network off."""
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--proxy-server=http://127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1366,768",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_report_draws_every_figure_in_headless_chromium_with_the_network_off(demo_out, tmp_path):
    browser = _browser_or_skip()
    report = demo_out / "results" / "report.html"
    html = report.read_text(encoding="utf-8")
    n_figures = len(re.findall(r'class="plotly-graph-div"', html))
    assert n_figures >= 5
    proc = _dump_dom(browser, report, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    drawn = re.findall(r'<div[^>]*class="[^"]*js-plotly-plot[^"]*"', dom)
    assert len(drawn) == n_figures, f"{len(drawn)} of {n_figures} figures drawn"
    assert dom.count('class="main-svg"') >= n_figures
    console_errors = [
        line
        for line in proc.stderr.splitlines()
        if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)
    ]
    assert console_errors == []


# Clicks Figure 2's download buttons once the figure is drawn, catches the link that plotly
# clicks to save the file, reads the file it points to and writes what it found into the page.
_CLICK_DOWNLOADS_JS = """<script>
(function () {
  var saved = [];
  HTMLAnchorElement.prototype.click = function () {
    var name = this.download;
    saved.push(fetch(this.href).then(function (r) { return r.arrayBuffer(); }).then(
      function (buf) {
        var head = Array.from(new Uint8Array(buf.slice(0, 8)));
        return {name: name, bytes: buf.byteLength, head: head};
      }));
  };
  function report(found) {
    var pre = document.createElement("pre");
    pre.id = "download-log";
    pre.textContent = JSON.stringify(found);
    document.body.appendChild(pre);
  }
  function attempt(tries) {
    var buttons = document.querySelectorAll('button[data-download][data-filename="figure2"]');
    var drawn = buttons.length &&
      document.querySelector("#" + buttons[0].dataset.target + " .main-svg");
    if (!drawn) { if (tries > 0) setTimeout(function () { attempt(tries - 1); }, 200); return; }
    buttons.forEach(function (b) { b.click(); });
    setTimeout(function () { Promise.all(saved).then(report); }, 4000);
  }
  window.addEventListener("load", function () { attempt(50); });
})();
</script>"""


def test_figure2_downloads_as_png_and_svg_from_the_page(demo_out, tmp_path):
    browser = _browser_or_skip()
    html = (demo_out / "results" / "report.html").read_text(encoding="utf-8")
    assert html.count('data-filename="figure2"') == 2  # one PNG and one SVG button
    page = tmp_path / "report-click.html"
    page.write_text(html.replace("</body>", _CLICK_DOWNLOADS_JS + "</body>"), encoding="utf-8")
    proc = _dump_dom(browser, page, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="download-log">(.*?)</pre>', proc.stdout, re.S)
    assert found, "the download buttons saved nothing"
    saved = {d["name"]: d for d in json.loads(found.group(1).replace("&quot;", '"'))}
    assert set(saved) == {"figure2.png", "figure2.svg"}, saved
    assert saved["figure2.png"]["head"] == [137, 80, 78, 71, 13, 10, 26, 10]  # the PNG signature
    assert bytes(saved["figure2.svg"]["head"][:4]) == b"<svg"
    assert saved["figure2.png"]["bytes"] > 10_000 and saved["figure2.svg"]["bytes"] > 10_000


def test_analyze_can_take_one_split_of_the_runs_data(demo_out, tmp_path):
    run = demo_out / "run"
    info = json.loads((run / "emolens_run.json").read_text())
    out = tmp_path / "test-split"
    assert (
        main(
            [
                "analyze",
                "--model",
                str(run),
                "--split",
                "test",
                "--out",
                str(out),
                "--layers",
                "-1",
                "--n-prompts",
                "1",
                "--min-count",
                "1",
                "--filter-mode",
                "none",
                "--alphas",
                "0,1",
                "--dla-per-label",
                "0",
                "--n-boot",
                "20",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    steps = pd.read_csv(out / "steps.csv")
    assert (steps.n_samples == len(info["splits"]["test"])).all()
    assert (
        main(["analyze", "--model", "tiny-random", "--split", "test", "--out", str(tmp_path / "x")])
        == 1
    )  # not a run folder: a clear error
