"""The report page in a real headless browser (Chromium, driven over the DevTools protocol on a pipe, standard
library only): it renders, every figure and table has a size, the script raises nothing and sorts and filters,
and a screenshot of its top is not blank. Slow: `python3 dev.py test-slow` installs Debian's `chromium` when it
is absent; without a browser the test skips and says so."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import report_runs as runs
from sqsd.config import ReportConfig
from sqsd.report import report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class Browser:
    """Chromium with --remote-debugging-pipe: JSON messages, each ended by a NUL byte, on fds 3 (in) and 4 (out)."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def plumb() -> None:  # in the child: its fd 3 reads our commands, its fd 4 writes the answers
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=plumb, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _message(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed its pipe")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(line)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._message()
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def wait_for(self, method: str) -> dict:
        while True:
            event = self._message()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def evaluate(self, expression: str):
        found = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in found:
            raise RuntimeError(found["exceptionDetails"])
        return found["result"].get("value")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self._write)
        os.close(self._read)


# per <img>/<svg>: its drawn size; per table: its size and rows
MEASURE = """JSON.stringify({
  body: document.body.scrollHeight,
  images: Array.from(document.querySelectorAll("img, svg")).map(e => {
    const r = e.getBoundingClientRect(); return [e.tagName, r.width, r.height, e.complete === undefined || e.complete,
                                                 e.naturalWidth === undefined ? 1 : e.naturalWidth]; }),
  tables: Array.from(document.querySelectorAll("table")).map(t => [t.offsetWidth, t.offsetHeight, t.rows.length]),
})"""


@pytest.mark.slow
def test_the_demo_sized_report_renders_in_a_headless_browser(tmp_path):
    executable = find_browser()
    if executable is None:
        pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)}); `python3 dev.py test-slow` "
                    "installs Debian's chromium with apt-get when it can")
    root = runs.demo_run(tmp_path / "demo", n=600)  # the demo's default pool size
    runs.experiment_run(root / "experiment")
    (root / "drift").mkdir()
    runs.jsonl(root / "drift" / "trajectory.jsonl", runs.trajectory_rows())
    page = report(ReportConfig(run_dir=str(root)))
    browser = Browser(executable, tmp_path / "profile")
    try:
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session=True)
        browser.call("Emulation.setDeviceMetricsOverride", session=True, width=1280, height=1000,
                     deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", session=True, url=page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        measured = json.loads(browser.evaluate(MEASURE))
        # the script: sorting by `score` (click twice: descending) puts the riskiest first; filtering hides rows
        order = browser.evaluate("""(() => {
            const table = document.querySelector("table.sortable");
            const th = Array.from(table.tHead.rows[0].cells).find(c => c.textContent === "score");
            th.click(); th.click();
            const first = table.tBodies[0].rows[0].cells[0].textContent;
            const input = table.parentNode.previousElementSibling;
            input.value = "pool.jsonl:"; input.dispatchEvent(new Event("input"));
            const shown = Array.from(table.tBodies[0].rows).filter(r => !r.hidden).length;
            input.value = "no such text at all"; input.dispatchEvent(new Event("input"));
            return [first, shown, Array.from(table.tBodies[0].rows).filter(r => !r.hidden).length];
        })()""")
        browser.evaluate("window.scrollTo(0, 0)")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", session=True, format="png")["data"])
    finally:
        browser.close()
    (tmp_path / "top.png").write_bytes(shot)
    errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    assert measured["body"] > 5000  # the whole page laid out, not an error page
    assert len(measured["images"]) == 6  # histograms, length, experiment x2, drift x2
    for tag, width, height, complete, natural in measured["images"]:
        assert width > 200 and height > 100 and complete and natural > 0, (tag, width, height)
    assert all(w > 300 and h > 40 and n >= 2 for w, h, n in measured["tables"])
    ranked = sorted((r for r in runs.score_rows(600, skipped=(3,)) if r["status"] == "ok"), key=lambda r: -r["score"])
    assert order == [str(ranked[0]["index"]), 600, 0]

    from PIL import Image  # a dependency of matplotlib

    image = Image.open(io.BytesIO(shot)).convert("L")
    assert image.size == (1280, 1000)
    histogram = image.histogram()
    assert max(histogram) < 0.97 * sum(histogram)  # not blank: text and tables drawn on the white page
