"""Two CPU processes (torchrun, gloo): sharded probes, same β and halt decision on every rank, rank 0 writes."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from helpers import free_port

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
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
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


FSDP2 = textwrap.dedent("""
    import copy, json, os, sys
    sys.path.insert(0, {tests!r})
    import numpy as np, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer
    from helpers import probe_records, tiny_model, tiny_sae
    from smda_callback import ProbeSet, SMDAConfig
    from smda_callback.capture import PairCapture
    from smda_callback.credit import is_sharded, sharding_check
    from smda_callback.lab.models import embedded_model_dir
    from smda_callback.sae import decoder_layers, resolve_hook
    from smda_callback.snapshot import Snapshotter
    dist.init_process_group("gloo")
    out, rank = sys.argv[1], dist.get_rank()
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    recs = probe_records() + [{{"prompt": "What is a prime number?", "label": "harmless", "category": "facts"}}]
    probes = ProbeSet.from_records(recs)  # 13 probes on 2 ranks: uneven shards, padded to equal forwards
    sae, cfg = tiny_sae(), SMDAConfig(n_features=8, probe_batch_size=4)
    model = tiny_model()
    ref = copy.deepcopy(model)
    want = Snapshotter(probes, tok, sae, resolve_hook(sae, ref), cfg).take(ref, full=True)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    snap = Snapshotter(probes, tok, sae, resolve_hook(sae, model), cfg).take(model, full=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    note = sharding_check(opt, "deconvolve")
    try:
        sharding_check(opt, "ghost")
        ghost = "accepted"
    except ValueError as exc:
        ghost = str(exc)
    cap = PairCapture(armed=True)
    cap.install(model, resolve_hook(sae, model))
    model.train()
    ids = tok(["Hello there, how are you?"], return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    np.savez(os.path.join(out, f"snap{{rank}}.npz"), Z=snap.Z, Y=snap.Y)
    json.dump({{"Z": float(np.abs(snap.Z - want.Z).max()), "Y": float(np.abs(snap.Y - want.Y).max()), "n": len(snap.Y),
               "sharded": any(is_sharded(p) for p in model.parameters()), "note": note, "ghost": ghost,
               "rows": len(cap.rows), "hidden": len(cap.hidden)}}, open(os.path.join(out, f"rank{{rank}}.json"), "w"))
    dist.destroy_process_group()
""")


def test_fsdp2_sharded_probe_pass_hooks_and_credit_rules_on_cpu(tmp_path, smol_tokenizer):
    """FSDP2 `fully_shard` on CPU (gloo, 2 ranks): the probe pass over sharded parameters with uneven probe shards
    gives the unsharded X and Y; the capture hook fires on a sharded layer; the ghost pass is refused with the fix and
    the in-step split is switched off with a warning. (The Trainer's own FSDP path cannot run on CPU: accelerate only
    switches to FSDP on accelerator devices, so on CPU `fsdp=...` silently trains as DDP; docs/scale.md.)"""
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           str(script), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in (0, 1):
        r = json.loads((out / f"rank{i}.json").read_text())
        assert r["sharded"] and r["n"] == 13
        assert r["Z"] < 1e-4 and r["Y"] < 1e-6, r  # same X and Y as the unsharded model
        assert "split inside a step" in r["note"] and "credit_measure='deconvolve'" in r["ghost"]
        assert r["rows"] == 1 and r["hidden"] == 1  # the hook on the sharded layer fired
    # one process, no sharding of probes or parameters: the same X and Y as the two ranks gathered
    from helpers import probe_records, tiny_model, tiny_sae
    from smda_callback import ProbeSet, SMDAConfig
    from smda_callback.sae import resolve_hook
    from smda_callback.snapshot import Snapshotter

    recs = probe_records() + [{"prompt": "What is a prime number?", "label": "harmless", "category": "facts"}]
    model, sae = tiny_model(), tiny_sae()
    one = Snapshotter(ProbeSet.from_records(recs), smol_tokenizer, sae, resolve_hook(sae, model),
                      SMDAConfig(n_features=8, probe_batch_size=4)).take(model, full=True)
    two = np.load(out / "snap0.npz")
    np.testing.assert_allclose(two["Y"], one.Y, rtol=0, atol=1e-6)
    np.testing.assert_allclose(two["Z"], one.Z, rtol=1e-4, atol=1e-4)
