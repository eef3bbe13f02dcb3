"""Policy variants tried for issue 24 (docs/validation.md §7, "Tried on 2026-12-03"): can another target or
another selection set lift the nested AUROC of the symbolic policy? A validation experiment, not part of the
package: it snapshots the probes, the held-out prompts and the training pairs' prompts through the shipped SAE
(one probe pass each) and scores every variant with the package's own recipe (`baseline.fit_baseline` with the
features fixed per training fold, 5 folds, 3 fold splits).

    python experiments/policy_variants.py                       # the base model (the baseline policy)
    python experiments/policy_variants.py --model runs/demo/model  # a tuned model (the policy after training)
    python experiments/policy_variants.py --model M --codes-from embedded  # features chosen on the base model's codes
    python experiments/policy_variants.py --train-sft runs/sft318  # first train the demo's SFT on all pairs (no callback)

Variants: the selection set (the probes of the training fold, as the package does; those plus the 318 training
pairs' prompts; the pairs alone), the selection score (the labels' standardised difference, as the package does;
or |correlation| with the model's refusal Y), the target (Y, as the package does; or its log-odds, clipped to
[1e-4, 1 − 1e-4]) and the number of latents. Content latents only, first-token scorer.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from smda_callback._resources import DATA
from smda_callback.baseline import fit_baseline
from smda_callback.config import SMDAConfig
from smda_callback.features import load_cards
from smda_callback.lab.models import load_model
from smda_callback.policy import auroc, fold_splits, select_features
from smda_callback.probes import ProbeSet
from smda_callback.sae import embedded_sae_dir, load_sae, resolve_hook
from smda_callback.snapshot import Snapshotter

CFG = SMDAConfig(scorer="first_token", probe_batch_size=16)


def codes(model_dir: str | None) -> dict[str, np.ndarray]:
    model, tok = load_model(model_dir)
    model.eval()
    sae = load_sae(str(embedded_sae_dir()))
    hook = resolve_hook(sae, model)
    out = {}
    for name, file in (("p", "probes.jsonl"), ("h", "heldout.jsonl"), ("s", "pairs.jsonl")):
        ps = ProbeSet.from_jsonl(DATA / file)
        snap = Snapshotter(ps, tok, sae, hook, CFG).take(model, full=True)
        out["Z" + name], out["Y" + name], out["h" + name] = snap.Z, snap.Y, np.asarray(ps.is_harmful)
    return out


def train_sft(out: Path) -> str:
    """The demo's SFT of the embedded model on all shipped pairs (its settings, seed 0), without the callback:
    the model of `smda demo` (lab/demo.py's settings and data), saved to out/model once."""
    from trl import SFTTrainer

    from smda_callback.lab.demo import DemoSettings, load_pairs, sft_config, to_dataset

    if not (out / "model" / "config.json").exists():
        model, tok = load_model()
        args = sft_config(out, DemoSettings(seed=0))
        args.report_to = []
        trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(load_pairs(DATA / "pairs.jsonl")),
                             processing_class=tok)
        trainer.train()
        trainer.save_model(str(out / "model"))
        tok.save_pretrained(str(out / "model"))
    return str(out / "model")


def corr_select(Z: np.ndarray, y: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    Zc, yc = Z - Z.mean(0), y - y.mean()
    c = np.abs((Zc * yc[:, None]).mean(0)) / (Zc.std(0) * yc.std() + 1e-12)
    c = np.where(allowed & (Z.std(0) > 0), c, -np.inf)
    return np.sort(np.argsort(-c, kind="mergesort")[:k])


def logit(y: np.ndarray) -> np.ndarray:
    y = np.clip(y, 1e-4, 1 - 1e-4)
    return np.log(y / (1 - y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a tuned model directory (default: the embedded base model)")
    ap.add_argument("--codes-from", default=None, help="choose features on this model's codes ('embedded': the base model)")
    ap.add_argument("--train-sft", metavar="DIR", default=None,
                    help="train the demo's SFT on all pairs into DIR/model (once) and check that model")
    ap.add_argument("--counts", type=int, nargs="+", default=[32, 48, 64, 128])
    a = ap.parse_args()
    if a.train_sft:
        a.model = train_sft(Path(a.train_sft))
    d = codes(a.model)
    sel = d if a.codes_from is None else codes(None if a.codes_from == "embedded" else a.codes_from)
    cards = load_cards(embedded_sae_dir())
    allowed = np.asarray([cards.get(j, {}).get("kind") == "content" for j in range(d["Zp"].shape[1])])
    Zp, Yp, hp = d["Zp"], d["Yp"], d["hp"].astype(bool)
    Sp, Ss, Ys_sel, hs = sel["Zp"], sel["Zs"], sel["Ys"], sel["hs"].astype(bool)
    Ysp = sel["Yp"]
    sets = {
        "probes (package)": lambda tr, k, score: (select_features(Sp[tr], hp[tr], k, allowed) if score == "labels"
                                                  else corr_select(Sp[tr], Ysp[tr], k, allowed)),
        "probes + pairs": lambda tr, k, score: (
            select_features(np.vstack([Sp[tr], Ss]), np.concatenate([hp[tr], hs]), k, allowed) if score == "labels"
            else corr_select(np.vstack([Sp[tr], Ss]), np.concatenate([Ysp[tr], Ys_sel]), k, allowed)),
        "pairs": lambda tr, k, score: (select_features(Ss, hs, k, allowed) if score == "labels"
                                       else corr_select(Ss, Ys_sel, k, allowed)),
    }
    print(f"model {a.model or 'embedded'}; features chosen on {a.codes_from or 'the same model'}'s codes; the model's "
          f"own refusal AUROC vs labels: probes {auroc(Yp, hp):.3f}, held-out {auroc(d['Yh'], d['hh']):.3f}\n")
    print("| selection set | score | target | latents | nested AUROC (3 splits) | per split | held-out prompts |")
    print("|---|---|---|---|---|---|---|")
    for set_name, choose in sets.items():
        for score in ("labels", "|corr| with Y"):
            for tname, target in (("Y", lambda y: y), ("log-odds of Y", logit)):
                for k in a.counts:
                    aucs = []
                    for split in range(3):
                        held = np.empty(len(Yp))
                        for tr, te in fold_splits(len(Yp), 5, split):
                            c = replace(CFG, features=tuple(int(j) for j in choose(tr, k, score)))
                            held[te] = fit_baseline(Zp[tr], target(Yp[tr]), hp[tr], c, allowed, report=False).predict(Zp[te])
                        aucs.append(auroc(held, hp))
                    every = np.arange(len(Yp))
                    full = fit_baseline(Zp, target(Yp), hp, replace(CFG, features=tuple(int(j) for j in choose(every, k, score))),
                                        allowed, report=False)
                    print(f"| {set_name} | {score} | {tname} | {k} | {np.mean(aucs):.3f} | "
                          f"{' / '.join(f'{v:.2f}' for v in aucs)} | {auroc(full.predict(d['Zh']), d['hh']):.3f} |", flush=True)


if __name__ == "__main__":
    main()
