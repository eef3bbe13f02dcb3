"""Kept LDS runs side by side (lab/lds_runs.py, `smda lds-runs`): the best free reader per run leaves out replays, peers
and the random control; a reader's gap to it, the runs within the margin and at each threshold are counted unrounded."""

from __future__ import annotations

import json

import pytest

from smda_callback.cli.main import main
from smda_callback.lab.lds_runs import compare, format_runs, is_free, load_run
from smda_callback.lab.specs import REMOVAL_READER


def _kept(path, readers, seed=0, n_pairs=64, chance=0.3, order=None):
    score = {"n_pairs": n_pairs, "n_subsets": 40, "full_refusal": {"harmful": 0.6 + seed / 100, "harmless": 0.3},
             "measured_abs_mean": {"harmful": 0.04, "harmless": 0.025},
             "chance": {q: [-chance, chance] for q in ("harmful", "harmless")},
             "readers": {n: {"harmful": {"lds": h, "slope": 1.0}, "harmless": {"lds": l, "slope": 1.0}}
                         for n, (h, l) in readers.items()}}
    path.write_text(json.dumps({"what": "test", "settings": {"seed": seed, "n_pairs": n_pairs}, "score": score,
                                "order": order or [f"p{seed}-{i}" for i in range(n_pairs)]}))
    return path


def test_free_readers_are_the_ledgers_own():
    assert is_free("credit (default)") and is_free(REMOVAL_READER) and is_free("label count, carried AR(2) joint")
    assert not is_free("replay, last 90 steps (dropped in place)") and not is_free("random")
    assert not is_free("ekfac (final weights)") and not is_free("leave-one-out retrains, summed")


def test_the_best_free_reader_and_the_gap_to_it_per_run(tmp_path):
    a = _kept(tmp_path / "a.json", {"credit (default)": (0.1, 0.2), REMOVAL_READER: (0.385, 0.62), "label count": (0.3, 0.3),
                                    "random": (0.9, 0.9), "replay, last 90 steps (dropped in place)": (0.8, 0.8)})
    b = _kept(tmp_path / "b.json", {"credit (default)": (0.1, 0.1), REMOVAL_READER: (0.5, 0.5),
                                    "label count, carried AR(2) joint": (0.75, 0.8)}, seed=2)
    c = _kept(tmp_path / "c.json", {"credit (default)": (0.2, 0.2)}, seed=3)  # an older file without the reader
    runs = [load_run(p) for p in (a, b, c)]
    cmp = compare(runs)
    ra, rb, rc = cmp["runs"]
    assert ra["best"] == REMOVAL_READER and ra["gap"] == 0.0 and ra["within"]  # random and the replay are not free
    assert rb["best"] == "label count, carried AR(2) joint" and rb["gap"] == pytest.approx(-0.275) and not rb["within"]
    assert rc["lds"] is None and rc["best"] == "credit (default)"
    assert cmp["n_with_reader"] == 2 and cmp["within"] == 1
    assert cmp["at_least"] == {"0.39": 1, "0.6": 0}  # 0.385 is not 0.39, whatever it rounds to
    assert compare(runs, margin=0.3)["within"] == 2
    text = format_runs(runs, cmp)
    assert "| replay, last 90 steps (dropped in place) (not free) | +0.80* / +0.80* | – | – |" in text
    assert "| credit (default) | +0.10 / +0.20 | +0.10 / +0.10 | +0.20 / +0.20 |" in text  # inside ±0.3: no star
    assert "within 0.05 of the best free reader on 1 of 2 runs; ≥ 0.39 on both quantities on 1 of 2" in text
    assert "c: best free credit (default) (+0.20 / +0.20); `own window, carried AR(2)` not scored in this file" in text
    assert "share one training order" not in text
    # each run's own levels above the readers, so a reader's LDS can be read beside them
    assert "| *final refusal of the full run* | 0.600 / 0.300 | 0.620 / 0.300 | 0.630 / 0.300 |" in text
    assert "| *mean absolute measured change over subsets* | 0.040 / 0.025 | 0.040 / 0.025 | 0.040 / 0.025 |" in text
    # the same ranking run kept twice (other subsets or readers) is named, since the counts take it as two runs
    d = _kept(tmp_path / "d.json", {"credit (default)": (0.2, 0.3)}, seed=0)
    again = [load_run(p) for p in (a, b, d)]
    assert "Note: a, d share one training order" in format_runs(again, compare(again))
    # an older kept file without the levels (or with one quantity missing) shows – in those cells, not a crash
    e = tmp_path / "e.json"
    old = json.loads(b.read_text())
    del old["score"]["full_refusal"]
    old["score"]["measured_abs_mean"] = {"harmful": 0.05}
    e.write_text(json.dumps(old))
    mixed = [load_run(p) for p in (a, e)]
    text = format_runs(mixed, compare(mixed))
    assert "| *final refusal of the full run* | 0.600 / 0.300 | – |" in text
    assert "| *mean absolute measured change over subsets* | 0.040 / 0.025 | – |" in text


def test_the_command_reads_kept_files_and_refuses_what_is_not_one(tmp_path, capsys):
    a = _kept(tmp_path / "a.json", {"credit (default)": (0.1, 0.2), REMOVAL_READER: (0.4, 0.6)})
    assert main(["lds-runs", str(a), "--json", "--at", "0.6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compare"]["at_least"] == {"0.6": 0} and out["runs"][0]["name"] == "a"
    assert main(["lds-runs", str(a), "--reader", "credit (default)"]) == 0
    assert "`credit (default)`: within 0.05 of the best free reader on 0 of 1 runs" in capsys.readouterr().out
    # a scored benchmark-lds folder not kept yet reads as its kept file would
    folder = tmp_path / "run_dir"
    folder.mkdir()
    kept = json.loads(a.read_text())
    (folder / "lds.json").write_text(json.dumps(kept["score"]))
    (folder / "subsets.json").write_text(json.dumps({"settings": kept["settings"], "order": kept["order"], "subsets": {}}))
    assert load_run(folder) == {**load_run(a), "name": "run_dir"}
    (folder / "lds.json").unlink()  # not scored yet
    assert main(["lds-runs", str(folder)]) == 2
    assert "lds.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"jobs": {}}))
    assert main(["lds-runs", str(a), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a kept LDS file or a scored benchmark-lds folder" in err and "--score-only" in err
    assert "Traceback" not in err
    assert main(["lds-runs", str(a), "--reader", "no such reader"]) == 2
    assert "no given file scores it; readers in them: credit (default), own window, carried AR(2)" in capsys.readouterr().err
