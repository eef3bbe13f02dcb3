"""`smda report RUN_DIR`: one self-contained HTML file (plots embedded, no network, text escaped)."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analysis import (CREDIT_READS, category_gaps, category_movers, interference_table, pair_rows, pathway_by_label, read_note,
                       suspects, top_pairs)
from ..ledger import smda_dir, load_credits, load_policy, load_records, load_replay

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
main{max-width:1120px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 2px} h2{font-size:20px;margin:34px 0 8px;border-bottom:2px solid #dde2ea;padding-bottom:4px}
.sub{color:#5b6576;margin:0 0 16px} .card{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:14px 18px;margin:12px 0}
table{border-collapse:collapse;width:100%;font-size:13px} th,td{padding:5px 8px;border-bottom:1px solid #e7eaf0;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.policy{white-space:pre-wrap;word-break:break-word;background:#f3f5f9;padding:8px 10px;border-radius:6px}
.kpis{display:flex;gap:12px;flex-wrap:wrap} .kpi{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:10px 14px;min-width:150px}
.kpi b{display:block;font-size:20px} .kpi span{color:#5b6576;font-size:12px}
.alert{color:#b42318;font-weight:600} .ok{color:#067647;font-weight:600} img{max-width:100%;height:auto}
.note{color:#5b6576;font-size:12.5px} nav a{margin-right:14px;color:#2450a6;text-decoration:none;font-size:14px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _marked(text: str) -> str:
    """Escape a card context and highlight its «activating token»."""
    return re.sub(r"«(.*?)»", r"<mark>\1</mark>", _e(text))


def _fig(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(df: pd.DataFrame, fmt: dict[str, str] | None = None) -> str:
    fmt = fmt or {}
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = row[c]
            if isinstance(v, (float, np.floating)):
                cells.append(f'<td class="num">{"–" if not np.isfinite(v) else format(v, fmt.get(c, ".3g"))}</td>')
            else:
                cells.append(f"<td>{_e(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _short(label: str, n: int = 28) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _policy_plot(policy: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b0, b1 = np.asarray(policy["beta_0"]), np.asarray(policy["beta_final"])
    order = np.argsort(-np.maximum(np.abs(b0), np.abs(b1)))[:20][::-1]
    labels = [_short(policy["feature_labels"][j]) for j in order]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(order) + 1.2))
    y = np.arange(len(order))
    ax.barh(y - 0.2, b0[order], height=0.4, label="before (β₀)", color="#9aa6b8")
    ax.barh(y + 0.2, b1[order], height=0.4, label="after (β_T)", color="#2450a6")
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="#333", lw=0.6)
    ax.set_xlabel("ridge coefficient (per baseline s.d. of the feature)")
    ax.legend(loc="lower right", fontsize=8)
    return _fig(fig)


def _category_plot(gaps: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.3 * len(gaps) + 1.2))
    y = np.arange(len(gaps))
    colors = ["#b42318" if l == "harmful" else "#067647" for l in gaps["label"]]
    ax.barh(y, gaps["after"], color=colors, alpha=0.85, label="after")
    ax.scatter(gaps["before"], y, color="#1d2433", zorder=3, s=14, label="before")
    ax.set_yticks(y, [f"{c} ({l})" for c, l in zip(gaps["category"], gaps["label"])], fontsize=8)
    ax.set_xlabel("mean refusal probability on probes")
    ax.set_xlim(0, max(1.0, float(gaps[["before", "after"]].max().max())))
    ax.legend(fontsize=8, loc="lower right")
    return _fig(fig)


def _pathway_plot(path: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    top = path.head(10)
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(top) + 1.3))
    y = np.arange(len(top))[::-1]
    w = 0.2
    for off, col, name, color in [(1.5, "harmful_dx", "harmful ΔX", "#e6846f"), (0.5, "harmful_dy", "harmful ΔY", "#b42318"),
                                  (-0.5, "harmless_dx", "harmless ΔX", "#7cc49a"), (-1.5, "harmless_dy", "harmless ΔY", "#067647")]:
        ax.barh(y + off * w, top[col], height=w, color=color, label=name)
    ax.set_yticks(y, [_short(l) for l in top["label"]], fontsize=8)
    ax.axvline(0, color="#333", lw=0.6)
    ax.set_xlabel("mean Δβ per pair, by pathway")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return _fig(fig)


def _split_over_time(records: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    rs = [r for r in records if "delta_beta_x" in r]
    steps = [r["step"] for r in rs]
    ax_ = np.cumsum([np.abs(r["delta_beta_x"]).sum() for r in rs])
    ay_ = np.cumsum([np.abs(r["delta_beta_y"]).sum() for r in rs])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
    a1.plot(steps, ax_, label="activation pathway Σ|Δβ_X|", color="#2450a6")
    a1.plot(steps, ay_, label="output pathway Σ|Δβ_Y|", color="#b42318")
    a1.set_xlabel("step")
    a1.legend(fontsize=8)
    a1.set_title("cumulative pathway magnitude", fontsize=10)
    a2.plot(steps, [r.get("refusal_harmful", np.nan) for r in rs], label="harmful probes", color="#b42318")
    a2.plot(steps, [r.get("refusal_harmless", np.nan) for r in rs], label="harmless probes", color="#067647")
    alerts = [r["step"] for r in rs if r.get("alert")]
    for s in alerts:
        a2.axvline(s, color="#f79009", lw=0.8, alpha=0.6)
    a2.set_xlabel("step")
    a2.set_title("measured refusal (orange lines: alerts)", fontsize=10)
    a2.legend(fontsize=8)
    return _fig(fig)


def _after_fit(fit: dict[str, Any] | None) -> str:
    """The policy the tuned model follows (refitted on the last full snapshot), with its own honest numbers."""
    if not fit:
        return ""
    return (f"<p class='note'>Policy after training (baseline recipe refitted on the tuned model's probes, features "
            f"re-chosen): in-sample R² {fit['r2']:.3f}, AUROC vs labels {fit['auroc_labels']:.3f}; nested AUROC "
            f"{fit.get('cv_auroc_nested', float('nan')):.3f}, R² {fit.get('cv_r2_nested', float('nan')):.3f}; measured "
            f"refusal's own AUROC vs labels {fit['auroc_y_labels']:.3f}.</p><div class='policy mono'>{_e(fit.get('policy', ''))}</div>")


def collapse_movers(movers: dict[str, list[dict[str, Any]]], categories: list[str]) -> list[dict[str, Any]]:
    """One row per pair: a pair that tops several categories is one finding that lists them, not many."""
    by_pair: dict[Any, dict[str, Any]] = {}
    for c in categories:
        for m in movers.get(c, []):
            row = by_pair.setdefault(m.get("index"), {"pair": m.get("index"), "pair label": m.get("label"),
                                                     "pair category": m.get("category"),
                                                     "prompt": str(m.get("prompt") or "")[:90], "moves": []})
            row["moves"].append((c, m["delta"]))
    rows = []
    for row in sorted(by_pair.values(), key=lambda r: -max(abs(d) for _, d in r["moves"])):
        moves = sorted(row.pop("moves"), key=lambda cd: -abs(cd[1]))
        rows.append({**row, "probe categories (Δ refusal beyond the step's mean)":
                     ", ".join(f"{c} {d:+.3g}" for c, d in moves), "n categories": len(moves)})
    return rows


def build_html(run_dir: str | Path) -> str:
    policy = load_policy(run_dir)
    records = load_records(run_dir)
    fit = policy["fit"]
    gaps = category_gaps(policy)
    credits = load_credits(run_dir)
    path = pathway_by_label(records, policy, credits)
    inter = interference_table(records, policy, n=12, credits=credits)
    movers = category_movers(records, policy, credits=credits)
    rows = pair_rows(records, credits)
    protocol = "counterfactual (one SGD step per pair from the same base)" if policy.get("protocol") == "counterfactual" \
        else "in-training (sequential optimizer steps of the real run)"
    halted = policy.get("halted")
    n_alerts = policy.get("n_alerts", 0)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>SMDA report</title><style>{CSS}</style></head><body><main>",
             "<h1>Symbolic Mechanistic Data Attribution</h1>",
             f"<p class='sub'>Run <span class='mono'>{_e(Path(run_dir).resolve())}</span> · protocol: {_e(protocol)} · "
             f"{len(records)} ledger records · SAE hook {_e(policy.get('hook'))}</p>",
             "<nav><a href='#policy'>Policy</a><a href='#categories'>Category gaps</a><a href='#pathways'>Harmful vs harmless</a>"
             "<a href='#interference'>Interference</a><a href='#toppairs'>Top pairs</a><a href='#training'>Over training</a></nav>",
             "<div class='kpis'>",
             f"<div class='kpi'><b>{len(policy['features'])}</b><span>SAE features in the policy</span></div>",
             f"<div class='kpi'><b>{fit.get('cv_auroc_nested', float('nan')):.2f}</b><span>nested held-out AUROC of the baseline policy vs labels</span></div>",
             f"<div class='kpi'><b>{fit['r2']:.2f}</b><span>baseline R² (λ={policy['lambda']:.3g})</span></div>",
             f"<div class='kpi'><b>{len(rows)}</b><span>{'pairs credited (' + _e(credits['rule']) + ' credit)' if credits else 'pair-steps attributed'}</span></div>",
             f"<div class='kpi'><b class='{'alert' if n_alerts else 'ok'}'>{n_alerts}</b><span>interference alerts</span></div>",
             f"<div class='kpi'><b class='{'alert' if halted else 'ok'}'>{'halted @ ' + str(halted['step']) if halted else 'no'}</b><span>training halted</span></div>",
             "</div>"]
    parts += ["<h2 id='policy'>1. The symbolic policy, before and after</h2>",
              f"<div class='card'><div class='note'>before</div><div class='policy mono'>{_e(policy['symbolic_policy_0'])}</div>"
              f"<div class='note' style='margin-top:8px'>after</div><div class='policy mono'>{_e(policy['symbolic_policy_final'])}</div>"
              f"<p class='note'>Fit at baseline: in-sample R² {fit['r2']:.3f}, AUROC vs labels {fit['auroc_labels']:.3f}; "
              f"nested {fit.get('cv_folds', '?')}-fold (features re-chosen in every training fold) AUROC "
              f"{fit.get('cv_auroc_nested', float('nan')):.3f}, R² {fit.get('cv_r2_nested', float('nan')):.3f}; "
              f"measured refusal's own AUROC vs labels {fit['auroc_y_labels']:.3f}. A nested AUROC near 0.5 means the policy is not worth reading.</p>"
              + _after_fit(policy.get("fit_after_training")) + "</div>",
              f"<div class='card'>{_policy_plot(policy)}</div>"]
    mv_rows = collapse_movers(movers, list(gaps["category"]))
    parts += ["<h2 id='categories'>2. Category gaps</h2>",
              "<p class='note'>Measured refusal probability per probe category. <i>gap</i> = after − mean over harmful categories: "
              "a harmful category far below zero is under-covered by the training data.</p>",
              f"<div class='card'>{_category_plot(gaps)}</div>",
              f"<div class='card'>{_table(gaps)}</div>",
              "<div class='card'><b>Pairs that moved each category most</b> (the category's change of measured refusal in the "
              "pair's step minus that step's mean change over all categories, × credit)"
              f"{_table(pd.DataFrame(mv_rows)) if mv_rows else '<p>none</p>'}</div>"]
    path_show = path[["label", "harmful_dx", "harmful_dy", "harmless_dx", "harmless_dy", "effect_r", "p", "q"]].head(15)
    parts += ["<h2 id='pathways'>3. Harmful vs harmless pairs, per feature</h2>",
              "<p class='note'>Mean per-pair contribution to each coefficient through the activation pathway (ΔX) and the "
              "output-probability pathway (ΔY). p: two-sided Mann–Whitney U on total Δβ across pairs, q: Benjamini–Hochberg; "
              "effect_r: rank-biserial correlation (positive = harmful pairs push the coefficient up more).</p>",
              f"<div class='card'>{_pathway_plot(path)}</div>", f"<div class='card'>{_table(path_show, {'p': '.2g', 'q': '.2g'})}</div>"]
    parts += ["<h2 id='interference'>4. Cross-feature interference</h2>",
              "<p class='note'>score = share of |Δβ| that landed outside the pair's intended features (its most active selected "
              "features); dominant = feature with the largest |Δβ| in the step.</p>",
              (f"<p class='alert'>Training halted at step {halted['step']}: {_e(halted['reason'])}</p>" if halted else ""),
              f"<div class='card'>{_table(inter[['step', 'index', 'label', 'category', 'prompt', 'intended', 'dominant', 'score', 'alert']]) if not inter.empty else '<p>no steps</p>'}</div>"]
    tp_rows = []
    for j in np.argsort(-np.abs(np.asarray(policy["beta_final"])))[:8]:
        up, down = top_pairs(records, policy, int(j), n=2, credits=credits)
        for kind, items in (("raised", up), ("lowered", down)):
            for it in items:
                tp_rows.append({"feature": policy["feature_labels"][j], "direction": kind, "Δβ": it["d"], "pair": it["index"],
                                "label": it["label"], "category": it["category"], "prompt": str(it["prompt"] or "")[:80]})
    if credits is not None:
        parts += ["<h2 id='suspects'>Suspects: pairs ranked by what they did</h2>",
                  f"<p class='note'>Credit rule <b>{_e(credits['rule'])}</b> (kernel {_e(credits['kernel']['kind'])}, "
                  f"measure {_e(credits['measure'])}; see docs/credit.md). Same ranking as <code>smda suspects RUN --target T</code>. "
                  "over-refusal: credited change of mean refusal on harmless probes; compliance: minus that on harmful probes. "
                  f"{_e(CREDIT_READS)}</p>"]
        parts.append(f"<p class='note'>{_e(forgetting_note(records, policy))}</p>")
        for target in ("over-refusal", "compliance"):
            sus = suspects(records, policy, credits, target, top=10)
            parts.append(_suspect_card(target, sus, columns=SUSPECT_COLUMNS[1:]))  # without the step column, as this table always was
        parts += removal_section(records, policy, credits)
        parts += replay_section(records, policy, credits, load_replay(run_dir))
    cards = policy.get("feature_cards") or {}
    if cards:
        beta = np.asarray(policy["beta_final"])
        items = []
        for j in np.argsort(-np.abs(beta)):
            f = str(int(policy["features"][j]))
            c = cards.get(f)
            if c is None:
                continue
            ctx = "".join(f"<tr><td class='num'>{x['activation']:.3g}</td><td class='mono'>{_marked(x['text'])}</td></tr>"
                          for x in c["contexts"][:10])
            url = (policy.get("feature_urls") or {}).get(f)
            page = f" · <a href='{_e(url)}'>Neuronpedia</a>" if url else ""
            items.append(f"<details><summary><b>f{_e(f)}</b> {_e(c['label'])} · <i>{_e(c['kind'])}</i> · β = {beta[j]:+.3g}"
                         f"{page}</summary><table>{ctx}</table></details>")
        parts += ["<h2 id='cards'>Feature cards of the policy</h2>",
                  "<p class='note'>Each policy feature's top activating contexts on held-out text (activating token "
                  "highlighted), its label and kind (content / format / function-word / position / template; features.py), its "
                  "Neuronpedia page where the SAE has an id, largest |β| first.</p>",
                  f"<div class='card'>{''.join(items)}</div>"]
    parts += ["<h2 id='toppairs'>5. Top pairs per feature</h2>",
              f"<div class='card'>{_table(pd.DataFrame(tp_rows)) if tp_rows else '<p>none</p>'}</div>",
              "<h2 id='training'>6. The pathway split over training</h2>", f"<div class='card'>{_split_over_time(records)}</div>",
              "<p class='note'>Generated by smda-callback. Exact split: Δβ_Y = ½(M₀+M₁)(Y₁−Y₀), Δβ_X = ½(M₁−M₀)(Y₀+Y₁).</p>",
              "</main></body></html>"]
    return "\n".join(parts)


def removal_section(records: list[dict[str, Any]], policy: dict[str, Any], credits: dict[str, Any]) -> list[str]:
    """What leaving a pair out would change at the end, ranked as `smda suspects --read removal` ranks it (free: read
    off the ledger), each target with its own fit in words (`read_note`); where this run's AR(2) response cannot be
    read off its ledger, why."""
    out = ["<h3 id='removal'>What leaving a pair out would change at the end (free: <code>--read removal</code>)</h3>",
           "<p class='note'>Each pair's own-window credit times the response of this run's fitted trajectory at the end "
           "to a push at the pair's place: a prediction of the change of final refusal that retraining without the pair "
           "would undo. For sets of pairs, not for finding planted bad pairs (see the reads above). Same ranking as "
           "<code>smda suspects RUN --target T --read removal</code>.</p>"]
    for target in ("over-refusal", "compliance"):
        try:
            sus = suspects(records, policy, credits, target, top=10, read="removal")
        except ValueError as e:
            out.append(f"<div class='card'><b>{_e(target)}, if left out</b><p class='note'>Not readable on this run: "
                       f"{_e(e)}</p></div>")
            continue
        note = "".join(f"<p class='note'>{_e(line.strip())}</p>" for line in read_note(sus))
        out.append(_suspect_card(f"{target}, if left out", sus, note))
    return out


def replay_section(records: list[dict[str, Any]], policy: dict[str, Any], credits: dict[str, Any],
                   replay: dict[str, Any] | None) -> list[str]:
    """The run's replay of its last steps (replay.json), ranked as `smda suspects --read replay` ranks it; nothing
    when the run had no replay."""
    if replay is None:
        return []
    out = [f"<h3 id='replay'>Carried to the end: the replay of steps {replay['first_step']}–{replay['last_step']}</h3>",
           "<p class='note'>SMDAConfig(replay_last_steps=K): reverse mode through the run's last steps after training "
           "(docs/credit.md). Score = the change of final mean refusal the pair's step made, carried through every later "
           "step (over-refusal: on the harmless probes; compliance: minus that on the harmful ones). Pairs trained before "
           f"step {replay['first_step']} are not ranked here. Same ranking as <code>smda suspects RUN --target T --read "
           "replay</code>. On the 318-pair demo run the last 90 steps predict retraining with LDS +0.78 / +0.74 (harmful / "
           "harmless refusal), on a 192-pair run in another order +0.79 / +0.81 (docs/validation.md §9).</p>"]
    cut = {q: s for q, s in replay.get("trusted_from", {}).items() if s > replay["first_step"]}
    if cut:
        out.append("<p class='note'><b>Not read:</b> " + "; ".join(
            f"{_e(q)} refusal before step {s}" for q, s in cut.items()) + ". There the replay's effects blew up (its "
            "linearisation, carried back through many steps, grew far beyond the later steps' effects); those steps are "
            "not ranked. Replay fewer steps, or read them as unknown.</p>")
    for target in ("over-refusal", "compliance"):
        sus = suspects(records, policy, credits, target, top=10, read="replay", replay=replay)
        out.append(_suspect_card(f"{target}, carried to the end", sus))
    return out


SUSPECT_COLUMNS = ("step", "index", "id", "label", "category", "score", "prompt")


def _suspect_card(title: str, sus: pd.DataFrame, note: str = "", columns: tuple[str, ...] = SUSPECT_COLUMNS) -> str:
    """One target's ranked pairs as a card: its title, an optional note (HTML, already escaped) and the table of
    `columns`; every suspects section of the report draws its cards here."""
    table = _table(sus[list(columns)]) if not sus.empty else "<p>none</p>"
    return f"<div class='card'><b>{_e(title)}</b>{note}{table}</div>"


def forgetting_note(records: list[dict[str, Any]], policy: dict[str, Any]) -> str:
    """The run's forgetting rate per refusal mean (carry.py) in words, or why it cannot be read."""
    from .carry import baseline_means, run_forgetting

    try:
        fg = run_forgetting(records, baseline_means(policy))
    except ValueError as e:
        return f"Forgetting rate: not readable from this run ({e})."

    def one(q: str) -> str:
        f = fg[q]
        half = (f"a push halves in ≈ {math.log(2) / -math.log(f.retention):.0f} windows" if f.retention < 1
                else "no pull back read")
        return f"{q} refusal κ = {f.kappa:.3f} [{f.ci95[0]:.3f}, {f.ci95[1]:.3f}] per window ({half})"

    return (f"Forgetting rate of this run, read off its ledger over {fg['harmful'].windows} windows (lab/carry.py): "
            f"{one('harmful')}; {one('harmless')}. Later training fades what an early pair did; "
            "`smda suspects RUN --target T --read end` ranks by what is left of it at the end of the run.")


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    out = Path(output) if output else smda_dir(run_dir) / "report.html"
    text = build_html(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)  # `smda report RUN -o new/dir/report.html`
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
