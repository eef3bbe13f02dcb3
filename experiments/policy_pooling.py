"""Pooling variants tried for issue 24 (docs/validation.md §7, "Tried on 2026-12-04"): does another way of pooling a
prompt's per-token SAE codes into one row of X, or two of them side by side, lift the symbolic policy's nested AUROC?
A validation experiment, not part of the package: one probe pass per pooling over the probes and the held-out
prompts, every variant scored by the package's own `policy_check.policy_scores` (48 content latents, first-token
scorer, nested 5-fold over 3 fold splits; a mix makes every latent eligible once per pooling).

    python experiments/policy_pooling.py                         # the base model (the baseline policy)
    python experiments/policy_pooling.py runs/lds318/run/model   # a tuned model (the policy after training)
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from smda_callback._resources import DATA
from smda_callback.baseline import allowed_latents
from smda_callback.config import SMDAConfig
from smda_callback.features import load_cards
from smda_callback.lab.models import load_model
from smda_callback.lab.policy_check import policy_scores
from smda_callback.probes import ProbeSet
from smda_callback.sae import embedded_sae_dir, load_sae, resolve_hook
from smda_callback.snapshot import Snapshotter

POOLINGS = ("mean", "max", "last", "eot")
MIXES = (("mean",), ("max",), ("last",), ("eot",), ("mean", "last"), ("mean", "max"), ("mean", "last", "max"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a saved model folder (default: the embedded base model)")
    ap.add_argument("--n-features", type=int, default=48)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    model.eval()
    sae = load_sae(str(embedded_sae_dir()))
    hook = resolve_hook(sae, model)
    cards = load_cards(embedded_sae_dir())
    probes, heldout = ProbeSet.from_jsonl(DATA / "probes.jsonl"), ProbeSet.from_jsonl(DATA / "heldout.jsonl")
    Z: dict[tuple[str, str], np.ndarray] = {}
    Yp = None
    for pool in POOLINGS:
        cfg = SMDAConfig(scorer="first_token", pooling=pool, probe_batch_size=16)
        for name, ps in (("probes", probes), ("heldout", heldout)):
            snap = Snapshotter(ps, tok, sae, hook, cfg).take(model, full=True)
            Z[pool, name] = snap.Z
            if name == "probes":
                Yp = snap.Y  # the refusal does not depend on the pooling
    allowed = allowed_latents(cards, ("content",), Z["mean", "probes"].shape[1])
    hp, hh = np.asarray(probes.is_harmful), np.asarray(heldout.is_harmful)
    cfg = SMDAConfig(scorer="first_token", n_features=a.n_features)
    print("| pooling of X | nested AUROC (per split) | held-out prompts | nested R² |\n|---|---|---|---|")
    for mix in MIXES:
        Zp = np.hstack([Z[p, "probes"] for p in mix])
        Zh = np.hstack([Z[p, "heldout"] for p in mix])
        r = policy_scores(Zp, Yp, hp, Zh, hh, cfg, np.concatenate([allowed] * len(mix)), {}, fold_seeds=3)
        split = " / ".join(f"{x:.2f}" for x in r["cv_auroc_nested_per_split"])
        print(f"| {' + '.join(mix)} | {r['cv_auroc_nested']:.3f} ({split}) | {r['heldout_auroc']:.3f} | {r['cv_r2_nested']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
