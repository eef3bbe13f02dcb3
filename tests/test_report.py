import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import ar_ledger, run_sft, tiny_model, tiny_sae
from smda_callback import SMDAConfig, load_ledger
from smda_callback.lab.report import build_html, write_report

SECTIONS = ["id='policy'", "id='categories'", "id='pathways'", "id='interference'", "id='toppairs'", "id='training'"]


@pytest.fixture(scope="module")
def halted_run(tmp_path_factory, smol_tokenizer):
    """A short run whose pair prompts contain HTML, halted by an alert."""
    import helpers

    tmp = tmp_path_factory.mktemp("run")
    orig = helpers.pair_records

    def evil(n=8):
        recs = orig(n)
        recs[0]["prompt"][0]["content"] = "<script>alert('x')</script> how do I build a bomb?"
        recs[0]["category"] = "<b>weapons</b>"
        return recs
    helpers.pair_records = evil
    try:
        cfg = SMDAConfig(n_features=8, intended_top_m=0, interference_threshold=0.0, min_history=0, on_alert="halt", patience=3)
        run_sft(tmp, tiny_model(), smol_tokenizer, tiny_sae(), cfg, max_steps=8, pairs=8)
    finally:
        helpers.pair_records = orig
    return tmp


def test_report_sections_and_escaping(halted_run):
    page = build_html(halted_run)
    for s in SECTIONS:
        assert s in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>weapons</b>" not in page
    assert "http://" not in page and "https://" not in page  # self-contained
    assert page.count("data:image/png;base64,") >= 4
    assert "Training halted at step" in page
    assert "Forgetting rate" in page  # κ per refusal mean, or why this short run cannot give it
    # 8 windows give no AR(2) fit: the removal read says so in its place instead of failing the report
    assert "id='removal'" in page and page.count("Not readable on this run: --read removal: this run&#x27;s AR(2)") == 2


def test_the_removal_section_ranks_as_suspects_read_removal_with_each_fit_in_words(tmp_path):
    """On a ledger that follows an AR(2) process the section lists, per target, the ten pairs `suspects(read="removal")`
    ranks first with its own κ and b and how far back its fit reaches (the CLI's words, `read_note`)."""
    from smda_callback.lab.analysis import read_note, suspects
    from smda_callback.lab.report import removal_section

    recs, policy, credits, _ = ar_ledger(tmp_path, 60, 0.08, 0.75)
    html = "".join(removal_section(recs, policy, credits))
    assert "Not readable" not in html and html.count("<table") == 2
    for target in ("over-refusal", "compliance"):
        sus = suspects(recs, policy, credits, target, top=10, read="removal")
        card = html[html.index(f"<b>{target}, if left out</b>"):]
        card = card[:card.index("</div>")]
        where = [card.index(f">{i}<") for i in sus["id"]]  # the same ten pairs, in the same order
        assert len(where) == 10 and where == sorted(where)
        fg = sus.attrs["forgetting"]
        assert f"κ = {fg['kappa']:.4f}, b = {fg['b'][0]:+.4f}, 60 windows" in card
        assert (f"the last {fg['reach']} of 60 windows only" in card) == (fg["reach"] < 60)
        assert read_note(sus)[0].startswith("--read removal: each score times the response")
        assert "the same pairs in another order rank otherwise" in read_note(sus)[0]  # a statement about one order


def test_the_forgetting_note_gives_kappa_and_its_half_life():
    from smda_callback.lab.report import forgetting_note

    policy = {"probes": [{"label": "harmful"}, {"label": "harmless"}], "probe_refusal_0": [0.0, 0.0]}
    q, recs = [0.0, 0.0], []
    for k in range(200):
        q = [q[0] + 0.01 - 0.05 * q[0] + 0.0005 * np.sin(k), q[1] + 0.002 - 0.02 * q[1] + 0.0005 * np.cos(k)]
        recs.append({"step": k + 1, "refusal_harmful": q[0], "refusal_harmless": q[1], "pairs": [{"label": "harmful"}]})
    note = forgetting_note(recs, policy)
    assert re.search(r"harmful refusal κ = 0\.05\d \[[^]]+\] per window \(a push halves in ≈ 1[34] windows\)", note)
    assert re.search(r"harmless refusal κ = 0\.0[12]\d \[[^]]+\] per window \(a push halves in ≈ 3[2-6] windows\)", note)
    assert "not readable" in forgetting_note(recs[:2], policy)


def test_load_ledger_shape(halted_run):
    df = load_ledger(halted_run)
    policy = json.loads((halted_run / "smda" / "policy.json").read_text())
    n_steps = len({r for r in df["step"]})
    assert len(df) == n_steps * len(policy["features"])
    assert {"step", "feature", "label", "delta_beta_x", "delta_beta_y", "pair_indices"} <= set(df.columns)


def test_report_in_headless_chromium(halted_run, tmp_path):
    """Render in a real browser: no console errors, main sections present, a PNG screenshot saved."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make setup installs it with apt-get where it can)")
    out = write_report(halted_run, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--enable-logging=stderr", "--v=0", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120)
    for s in SECTIONS:
        assert s.replace("'", '"') in dom.stdout or s in dom.stdout
    console_errors = [l for l in dom.stderr.splitlines() if "CONSOLE" in l and ("Error" in l or "error" in l)]
    assert console_errors == []
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", out.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
    assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_serves_our_tags_and_layout(halted_run):
    """A real `tensorboard --logdir` on loopback serves the run's smda/ scalars and the custom layout."""
    import socket
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(halted_run / "smda" / "tensorboard"),
                           "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, tags, layout = time.time() + 90, None, None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    assert r.status == 200
                    tags = json.loads(r.read())
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/custom_scalars/layout", timeout=5) as r:
                    layout = json.loads(r.read())
                if tags and any(tags.values()) and layout:
                    break
            except OSError:
                pass
            time.sleep(1)
        run_tags = set().union(*[set(v) for v in tags.values()])
        assert {"smda/interference/score", "smda/interference/alerts", "smda/pathway/x_share"} <= run_tags
        assert any(t.startswith("smda/refusal/") for t in run_tags) and any(t.startswith("smda/predicted/") for t in run_tags)
        assert {c["title"] for c in layout["category"]} == {"Policy", "Categories", "Pathways", "Interference"}
    finally:
        tb.terminate()
        tb.wait(timeout=30)


def test_a_pair_that_tops_many_categories_is_one_row_listing_them():
    from smda_callback.lab.report import collapse_movers

    movers = {"weapons": [{"index": 3, "delta": 0.2, "label": "harmful", "prompt": "forge"}, {"index": 7, "delta": -0.05}],
              "fraud": [{"index": 3, "delta": 0.1, "label": "harmful", "prompt": "forge"}],
              "drugs": [{"index": 3, "delta": -0.3, "label": "harmful", "prompt": "forge"}]}
    rows = collapse_movers(movers, ["weapons", "fraud", "drugs"])
    assert [r["pair"] for r in rows] == [3, 7] and rows[0]["n categories"] == 3
    assert rows[0]["probe categories (Δ refusal beyond the step's mean)"].startswith("drugs -0.3, weapons +0.2")
