"""Many latents instead of 48, tried for issue 24 (docs/validation.md §7, "Tried on 2026-12-04: many latents"): does
a ridge policy over 128 … all content latents, chosen by the package's score rule (all: no choice left), lift the
nested AUROC that 48 latents chosen on 104 probes per fold hold at 0.69 / 0.82? A validation experiment, not part of
the package: one probe pass over the probes and the held-out prompts, every count scored by the package's own
`policy_check.policy_scores` (first-token scorer, mean pooling, content latents, ridge λ by GCV, nested 5-fold over 3
fold splits). Prints one line per count: nested AUROC (per split), held-out-prompt AUROC, nested R².

    python experiments/policy_dense.py base                        # the base model (the baseline policy)
    python experiments/policy_dense.py runs/lds318/run/model       # a tuned model (the policy after training)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="`base` (the embedded base model) or a saved model folder")
    ap.add_argument("--counts", type=int, nargs="+", default=[48, 128, 256, 512, 1024, 0], help="0: every content latent")
    a = ap.parse_args()
    model, tok = load_model(None if a.model == "base" else a.model)
    model.eval()
    sae = load_sae(str(embedded_sae_dir()))
    hook = resolve_hook(sae, model)
    probes, heldout = ProbeSet.from_jsonl(DATA / "probes.jsonl"), ProbeSet.from_jsonl(DATA / "heldout.jsonl")
    cfg = SMDAConfig(scorer="first_token", probe_batch_size=16)
    sp = Snapshotter(probes, tok, sae, hook, cfg).take(model, full=True)
    sh = Snapshotter(heldout, tok, sae, hook, cfg).take(model, full=True)
    allowed = allowed_latents(load_cards(embedded_sae_dir()), ("content",), sp.Z.shape[1])
    hp, hh = np.asarray(probes.is_harmful), np.asarray(heldout.is_harmful)
    print("| content latents | nested AUROC (per split) | held-out prompts | nested R² |\n|---|---|---|---|")
    for n in a.counts:
        n = n or int(allowed.sum())
        r = policy_scores(sp.Z, sp.Y, hp, sh.Z, hh, replace(cfg, n_features=n), allowed, {}, fold_seeds=3)
        split = " / ".join(f"{x:.2f}" for x in r["cv_auroc_nested_per_split"])
        print(f"| {n} | {r['cv_auroc_nested']:.3f} ({split}) | {r['heldout_auroc']:.3f} | {r['cv_r2_nested']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
