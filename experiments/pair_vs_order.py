"""Descriptive look (issue 25), not a registered check: is a pair's score a property of the pair or of its place in
the run? Two kept LDS files of the same pairs trained in two data orders (lds318.json, Trainer seed 0, and
lds318o5.json, seed 5, both the full 318-pair demo set): per reader and quantity, the Spearman over pairs of each
pair's score in one order against its score in the other, over all pairs and within each label (the label alone
makes every reader agree across orders as far as it separates the two labels). Reads the kept files only.

    python experiments/pair_vs_order.py benchmarks/lds/lds318.json benchmarks/lds/lds318o5.json

The same for the three orders of the 64-pair set (lds64x, lds64o1, lds64o2: seeds 0, 1, 2), two files at a time.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from smda_callback.lab.analysis import spearman
from smda_callback.lab.carry import QUANTITIES

READERS = ("credit (default)", "own window", "step change", "own window, carried", "own window, carried AR(2)")


def main(first: str, second: str) -> None:
    a, b = (json.load(open(f)) for f in (first, second))
    if sorted(a["order"]) != sorted(b["order"]):
        raise SystemExit(f"{first} and {second} train different pairs; give two orders of one pair set")
    harmful = {i: a["reader_scores"]["label count"]["harmful"].get(i, 0.0) == 1.0 for i in a["order"]}
    place = {f: {i: k for k, i in enumerate(kept["order"])} for f, kept in ((first, a), (second, b))}
    print(f"places of the pairs in the two orders: Spearman {spearman(*(np.array([place[f][i] for i in a['order']]) for f in (first, second))):+.2f}")
    print("| reader | harmful refusal: all / harmful pairs / harmless pairs | harmless refusal: all / harmful / harmless |")
    print("|---|---|---|")
    for name in READERS:
        if name not in a["reader_scores"] or name not in b["reader_scores"]:
            continue
        cells = []
        for q in QUANTITIES:
            sa, sb = a["reader_scores"][name][q], b["reader_scores"][name][q]
            ids = [i for i in a["order"] if i in sa and i in sb]
            x, y = np.array([sa[i] for i in ids]), np.array([sb[i] for i in ids])
            parts = [spearman(x, y)]
            for lab in (True, False):
                k = [n for n, i in enumerate(ids) if harmful[i] == lab]
                parts.append(spearman(x[k], y[k]))
            cells.append(" / ".join(f"{v:+.2f}" for v in parts) + f" (n = {len(ids)})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
