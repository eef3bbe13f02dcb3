"""What one fresh AdamW step on each over-refusal plant does to the measured refusal (docs/validation.md §10, "Two more
fresh plantings"): from a model, for each of the 9 over-refusal plants of `data/plants.jsonl`, one step (AdamW, lr
1e-4, no decay, fresh moments) on the plant's token loss as SFT computes it (prompt masked), then one probe pass with
the demo's first-token scorer: the change of mean refusal on the harmless and on the harmful probes, and the plant's
first answer token. Is a plant the credit misses weak on the measured quantity, or invisible to the scorer? A
validation aid, not part of the package.

    python experiments/plant_one_step.py runs/poison_p6_o6/run/model    # or `base` for the embedded model
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from smda_callback.lab.counterfactual import pair_batch
from smda_callback.lab.lds import _snapshotter
from smda_callback.lab.models import load_model
from smda_callback.lab.poison import load_plants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a model folder, or `base` for the embedded model")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(None if a.model == "base" else a.model)
    probes, snap = _snapshotter(tok, model)  # the demo's first-token probe pass, as the LDS retrains measure
    harm = np.asarray(probes.is_harmful)
    print("refusal tokens of the scorer:", [tok.decode([i]) for i in snap.scorer.r_ids.tolist()])
    y0 = snap.take(model).Y
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for p in load_plants():
        if p["plant"] != "over-refusal":
            continue
        model.load_state_dict(state)
        model.train()
        ids, labels = pair_batch(tok, p, 512)
        n = int((labels[0] == -100).sum())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        y1 = snap.take(model).Y
        print(f"{p['id']:14s} first token {tok.decode(ids[0, n:n + 1])!r:8s} Δ harmless {np.mean(y1[~harm] - y0[~harm]):+.4f}  "
              f"Δ harmful {np.mean(y1[harm] - y0[harm]):+.4f}  {p['response'][:40]!r}")


if __name__ == "__main__":
    main()
