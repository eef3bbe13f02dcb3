"""Insert vs omit in the same optimizer: the replay reproduces the real run, and a pair's measured
effect is the difference of two branches that differ only by that pair."""

import json
import subprocess
import sys

import numpy as np
import pytest

from smda_callback.lab.causal import insert_vs_omit


@pytest.mark.slow  # a real-model demo run + replay: minutes (make test-all)
def test_insert_vs_omit_replays_the_run_and_measures_each_pair(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "smda_callback.cli", "demo", "--limit", "6", "--skip-answers", "--quiet",
                           "--out", str(run)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = tmp_path / "pairs.jsonl"
    from smda_callback.lab.demo import DATA, load_pairs

    pairs.write_text("".join(json.dumps(p) + "\n" for p in load_pairs(DATA / "pairs.jsonl", 6)))
    res = insert_vs_omit(run, pairs, n_pairs=2, horizon=2, out=tmp_path / "causal", first=2)
    assert res["n_pairs"] == 2 and res["steps"] == 6
    # the manual replay (same rows, collator, AdamW, schedule, clipping) is the Trainer's run
    assert res["replay_vs_ledger_harmless_abs_diff_max"] < 1e-4
    for row in res["pairs"]:
        assert np.isfinite(row["measured_harmless"]) and row["measured_harmless"] != 0.0  # the pair did something
    assert set(res["summary"]) == {"step", "optimizer_deconvolve"}
    assert (tmp_path / "causal" / "insert_vs_omit.json").exists()
