"""Per-step cost of SMDA on the embedded model, side by side in one run (`make bench`).

bare      one no-grad forward over the probes (batched, logits_to_keep=1): the physical limit
snapshot  our X+Y pass (shared chat-prefix KV, SAE encode, refusal scorer)
step      snapshot + ridge + exact decomposition + ledger/TensorBoard writes
naive     the obvious way: before+after passes each step, full logits, one forward per
          (probe, opening), SAE on every token kept in memory
sft       one plain SFT step (AdamW, one pair) without the callback
Prints a table of medians and ratios and writes benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from smda_callback import ProbeSet, RidgePolicy, SMDAConfig, decompose_step, embedded_sae_dir, load_sae, resolve_hook
from smda_callback.lab.demo import DATA, load_pairs
from smda_callback.lab.models import load_model
from smda_callback.sinks import LedgerWriter, TensorBoardSink
from smda_callback.snapshot import Snapshotter


def med(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_pass(model, tok, probes: ProbeSet, bs: int = 32) -> None:
    seqs = sorted(probes.tokenize(tok).input_ids, key=len)
    with torch.no_grad():
        for i in range(0, len(seqs), bs):
            b = seqs[i : i + bs]
            T = max(map(len, b))
            ids = torch.full((len(b), T), tok.pad_token_id)
            mask = torch.zeros((len(b), T), dtype=torch.long)
            for r, s in enumerate(b):
                ids[r, T - len(s):] = torch.tensor(s)
                mask[r, T - len(s):] = 1
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)


def naive_pass(model, tok, sae, hook, probes: ProbeSet, cfg: SMDAConfig, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct but slow: per probe, a full-logit forward for X and one forward per opening for Y."""
    from smda_callback.refusal import _combine, _encode_openings

    r_ids = _encode_openings(tok, cfg.refusal_openings, cfg.prefix_tokens)
    c_ids = _encode_openings(tok, cfg.compliance_openings, cfg.prefix_tokens)
    tp = probes.tokenize(tok)
    X, Y, keep = [], [], []
    cap = {}
    h = hook.register(model, lambda x: cap.__setitem__("h", x))
    try:
        with torch.no_grad():
            for i, ids in enumerate(tp.input_ids):
                model(input_ids=torch.tensor([ids]))
                z = sae.encode(cap["h"][0].float())  # every token, all latents, kept
                keep.append(z)
                s, e = tp.content[i]
                norms = cap["h"][0, s:e].norm(dim=-1)
                ok = norms <= cfg.outlier_norm_ratio * norms.median()  # same attention-sink rule as ours
                X.append(z[s:e][ok][:, features].mean(0).double().numpy())
                lps = []
                for cont in r_ids + c_ids:
                    lp = F.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0].float(), -1)
                    lps.append(sum(float(lp[len(ids) - 1 + j, cont[j]]) for j in range(len(cont))))
                lps = torch.tensor(lps)
                Y.append(float(_combine(torch.logsumexp(lps[: len(r_ids)], 0), torch.logsumexp(lps[len(r_ids):], 0), cfg.target)))
    finally:
        h.remove()
    return np.asarray(X), np.asarray(Y)


class PeakRSS:
    """Peak resident memory during a block, sampled from /proc every 5 ms (CPU torch has no allocator stats)."""

    def __enter__(self) -> "PeakRSS":
        import threading

        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_mb())
        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak - self.base


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scaled_probes(all_probes: ProbeSet, P: int) -> ProbeSet:
    """P probes: the shipped ones, harmful and harmless interleaved, cycled (distinct ids) past the file's size."""
    from itertools import chain, zip_longest

    from smda_callback.probes import Probe

    h = [p for p in all_probes.probes if p.harmful]
    s = [p for p in all_probes.probes if not p.harmful]
    src = [p for p in chain.from_iterable(zip_longest(h, s)) if p is not None]
    picked = [(i, src[i % len(src)]) for i in range(P)]
    return ProbeSet([Probe(id=f"{p.id}#{i}", prompt=p.prompt, label=p.label, category=p.category) for i, p in picked])


def random_topk_sae(d_in: int, width: int, k: int = 32, hook: str = "blocks.15.hook_resid_post") -> Any:
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=width, k=k, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    return sae


def step_cost(model, tok, sae, probes: ProbeSet, k: int, repeats: int) -> dict[str, float]:
    """Snapshot + ridge + exact decomposition at one (P, k, SAE) point, with peak RSS growth."""
    from smda_callback.policy import select_features

    cfg = SMDAConfig(n_features=k)
    snap = Snapshotter(probes, tok, sae, resolve_hook(sae, model), cfg)
    with PeakRSS() as full_mem:
        snap.features = select_features(snap.take(model, full=True).Z, probes.is_harmful, k)
    s0 = snap.take(model)
    pol = RidgePolicy(lam=1.0).freeze_scale(s0.X)
    M0 = pol.M(s0.X)
    with PeakRSS() as mem:
        t_snap = med(lambda: snap.take(model), repeats)
    t_math = med(lambda: decompose_step(pol, s0.X, s0.Y, s0.X + 1e-3, s0.Y, M0=M0), repeats)
    return {"snapshot_s": t_snap, "math_s": t_math, "peak_rss_growth_mb": mem.delta_mb,
            "baseline_full_snapshot_rss_growth_mb": full_mem.delta_mb}


def sweep(model, tok, all_probes: ProbeSet, repeats: int) -> list[dict[str, Any]]:
    """How the per-step cost grows with P, k and SAE width (random TopK SAE for widths we do not ship)."""
    shipped = load_sae(embedded_sae_dir())
    d_in = int(shipped.cfg.d_in)
    rows = []
    for P in (64, 128, 256, 512):
        rows.append({"vary": "P", "P": P, "k": 48, "width": int(shipped.cfg.d_sae),
                     **step_cost(model, tok, shipped, scaled_probes(all_probes, P), 48, repeats)})
    for k in (16, 64, 256):
        rows.append({"vary": "k", "P": 128, "k": k, "width": int(shipped.cfg.d_sae),
                     **step_cost(model, tok, shipped, scaled_probes(all_probes, 128), k, repeats)})
    for width in (4096, 16384, 65536):
        rows.append({"vary": "width", "P": 128, "k": 48, "width": width,
                     **step_cost(model, tok, random_topk_sae(d_in, width), scaled_probes(all_probes, 128), 48, repeats)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    ap.add_argument("--sweep", action="store_true", help="also P 64→512, k 16→256, SAE width 4k→64k")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model()
    model.eval()
    sae = load_sae(embedded_sae_dir())
    hook = resolve_hook(sae, model)
    all_probes = ProbeSet.from_jsonl(DATA / "probes.jsonl")
    results = {"threads": torch.get_num_threads(), "rows": []}

    # one SFT step on a pair, no callback
    pair = load_pairs(DATA / "pairs.jsonl")[0]
    msgs = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["response"]}]
    ids = torch.tensor([tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)

    def sft_step() -> None:
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.eval()
    sft = med(sft_step, a.repeats)

    for P in a.probes:
        probes = scaled_probes(all_probes, P)
        row: dict = {"P": len(probes), "sft_s": sft}
        row["bare_s"] = med(lambda: bare_pass(model, tok, probes), a.repeats)
        for name, cfg in [("snapshot", SMDAConfig()), ("snapshot_first_token", SMDAConfig(scorer="first_token")),
                          ("snapshot_paper", SMDAConfig.paper())]:
            snap = Snapshotter(probes, tok, sae, hook, cfg)
            full = snap.take(model, full=True)
            from smda_callback.policy import select_features

            snap.features = select_features(full.Z, probes.is_harmful, cfg.n_features)
            row[name + "_s"] = med(lambda: snap.take(model), a.repeats)
        snap = Snapshotter(probes, tok, sae, hook, SMDAConfig())
        snap.features = select_features(snap.take(model, full=True).Z, probes.is_harmful, 48)
        s0 = snap.take(model)
        pol = RidgePolicy(lam=1.0).freeze_scale(s0.X)
        with tempfile.TemporaryDirectory() as tmp:
            ledger, tb = LedgerWriter(tmp), TensorBoardSink(Path(tmp) / "tb")
            state = {"X": s0.X, "Y": s0.Y, "M": pol.M(s0.X), "step": 0}

            def math_and_logging(s1) -> None:
                M1 = pol.M(s1.X)
                d = decompose_step(pol, state["X"], state["Y"], s1.X, s1.Y, M0=state["M"], M1=M1)
                state.update(X=s1.X, Y=s1.Y, M=M1, step=state["step"] + 1)
                ledger.append({"step": state["step"], "beta": d.beta1, "delta_beta_x": d.delta_beta_x, "delta_beta_y": d.delta_beta_y})
                tb.scalars({f"smda/beta/{j}": float(b) for j, b in enumerate(d.beta1)}, state["step"])
                tb.histogram("smda/delta_beta", d.delta_beta, state["step"])

            row["math_log_s"] = med(lambda: math_and_logging(s0), a.repeats)
            row["step_s"] = med(lambda: math_and_logging(snap.take(model)), a.repeats)
            tb.close()
        t0 = time.perf_counter()
        Xn, Yn = naive_pass(model, tok, sae, hook, probes, SMDAConfig(), snap.features)
        row["naive_s"] = 2 * (time.perf_counter() - t0)  # before and after passes every step
        row["naive_vs_ours_max_abs_dY"] = float(np.abs(Yn - s0.Y).max())
        row["naive_vs_ours_max_rel_dX"] = float(np.abs(Xn - s0.X).max() / (np.abs(s0.X).max() + 1e-12))
        results["rows"].append(row)
    if a.sweep:
        results["sweep"] = sweep(model, tok, all_probes, a.repeats)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"{'P':>4} {'bare':>7} {'snap':>7} {'snap/bare':>9} {'step/bare':>9} {'naive/step':>10} {'(sft+step)/sft':>14} "
          f"{'math%':>6} {'ft/bare':>7} {'paper/bare':>10}")
    for r in results["rows"]:
        print(f"{r['P']:>4} {r['bare_s']:7.2f} {r['snapshot_s']:7.2f} {r['snapshot_s'] / r['bare_s']:9.2f} "
              f"{r['step_s'] / r['bare_s']:9.2f} {r['naive_s'] / r['step_s']:10.1f} {(r['sft_s'] + r['step_s']) / r['sft_s']:14.1f} "
              f"{100 * r['math_log_s'] / r['step_s']:6.1f} {r['snapshot_first_token_s'] / r['bare_s']:7.2f} "
              f"{r['snapshot_paper_s'] / r['bare_s']:10.2f}")
    print(f"peak RSS {results['peak_rss_mb']:.0f} MB; naive vs ours: max |ΔY| {results['rows'][-1]['naive_vs_ours_max_abs_dY']:.2e}, "
          f"max rel ΔX {results['rows'][-1]['naive_vs_ours_max_rel_dX']:.2e}")
    if a.sweep:
        print(f"\n{'vary':>5} {'P':>4} {'k':>4} {'width':>6} {'snapshot s':>10} {'ms/probe':>8} {'math ms':>8} {'RSS+ MB':>8}")
        for r in results["sweep"]:
            print(f"{r['vary']:>5} {r['P']:>4} {r['k']:>4} {r['width']:>6} {r['snapshot_s']:10.2f} "
                  f"{1000 * r['snapshot_s'] / r['P']:8.1f} {1000 * r['math_s']:8.2f} {r['peak_rss_growth_mb']:8.0f}")


if __name__ == "__main__":
    main()
