"""Two CPU processes (torchrun, gloo): sharded probes, same β and halt decision on every rank, rank 0 writes."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from transformers import AutoTokenizer
    from helpers import run_sft, tiny_model, tiny_sae
    from smda_callback import SMDAConfig
    from smda_callback.lab.models import embedded_model_dir
    out = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    cfg = SMDAConfig(n_features=8, intended_top_m=0, interference_threshold=0.0, min_history=0, on_alert="halt", patience=2)
    trainer, cb, _ = run_sft(out, tiny_model(), tok, tiny_sae(), cfg, max_steps=6, report_to=[], pairs=8,
                             ddp_backend="gloo")
    rank = int(os.environ["RANK"])
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as fh:
        totals = {{h: v.tolist() for h, v in cb.run.engine.totals.items()}}
        json.dump({{"step": trainer.state.global_step, "beta": cb.run.M.dot(cb.run.Y).tolist(), "credits": totals,
                   "world": int(os.environ["WORLD_SIZE"])}}, fh)
""")


def test_two_processes_agree_and_halt_together(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                           str(script), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == 2 and r0["step"] == r1["step"] == 2  # both ranks stopped at the alerting step
    np.testing.assert_array_equal(r0["beta"], r1["beta"])  # gathered probes → identical policy on each rank
    assert r0["credits"] == r1["credits"] and len(r0["credits"]) == 4  # the same per-pair credit on both ranks
    recs = [json.loads(l) for l in (out / "smda" / "attribution.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]  # written once (rank 0 only), no duplicate lines
    assert all(r["n_pairs"] == 2 for r in recs)  # one pair from each rank per step
    assert len({p["index"] for r in recs for p in r["pairs"]}) == 4
