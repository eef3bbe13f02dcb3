"""`smda` command line: demo, probe, report, attribute, validate, train-sae."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence


SHARD_THREADS = ("each process uses torch's CPU threads (OMP_NUM_THREADS, default one per core): on C cores give k "
                 "shards C/k threads each, since processes that ask for more threads than there are cores slow each other "
                 "several-fold")
MODEL_HELP = "a local HF model folder or a Hub id when a hub is reachable (default: the embedded model)"


def _emit(a: argparse.Namespace, result: Any, text: str) -> int:
    """`--json`: the result as JSON on stdout (nothing else); otherwise the human text."""
    print(json.dumps(result, indent=1, default=float) if getattr(a, "json", False) else text)
    return 0


def _demo(a: argparse.Namespace) -> int:
    from ..lab.demo import DemoSettings, format_summary, run_demo

    if not a.quiet and not a.json:
        print("smda demo: safety SFT of SmolLM2-135M-Instruct on the shipped pairs with SMDACallback, one probe pass per "
              "pair; the time estimate is measured after the first steps (--limit 40 for a quick run, --every 2 to halve "
              "the probing)", flush=True)
    settings = DemoSettings(limit=a.limit, on_alert=a.on_alert, epochs=a.epochs, seed=a.seed, scorer=a.scorer,
                            check_answers=not a.skip_answers,
                            every_n_steps=a.every_n_steps, replay_last_steps=a.replay_last, credit_measure=a.credit_measure,
                            **({"learning_rate": a.learning_rate} if a.learning_rate is not None else {}))
    summary = run_demo(a.out, a.pairs, a.probes, settings,
                       say=None if a.quiet or a.json else (lambda m: print(m, flush=True)))
    return _emit(a, summary, format_summary(summary, a.out) +
                 f"\nFinished in {summary['wall_seconds']:.0f} s ({summary['steps']} optimizer steps).")


def _probe(a: argparse.Namespace) -> int:
    from ..lab.probing import generate_answers, score_probes

    if a.generate:
        result = generate_answers(a.model, a.probes)
        if a.json:
            print(json.dumps(result, indent=1))
        else:
            print(f"refused (greedy answer opens with a refusal): harmful {result['refusal_rate_harmful']:.0%}, "
                  f"harmless {result['refusal_rate_harmless']:.0%}, harmless-but-edgy {result['over_refusal_edgy']:.0%}")
            for c, v in result["by_category"].items():
                print(f"  {c:28s} {v:.0%}")
        return 0
    result = score_probes(a.model, a.probes, a.policy, a.sae)
    if a.json:
        print(json.dumps(result, indent=1, default=float))
    else:
        for c, v in result["by_category"].items():
            print(f"{c:28s} {v:.3f}")
        if "policy_auroc" in result:
            print(f"policy AUROC vs labels: {result['policy_auroc']:.3f}  (measured-refusal AUROC {result['refusal_auroc']:.3f})")
    return 0


def _report(a: argparse.Namespace) -> int:
    from ..lab.report import write_report

    path = write_report(a.run_dir, a.output)
    return _emit(a, {"report": str(path)}, f"report written to {path}")


def _suspects(a: argparse.Namespace) -> int:
    from ..lab.analysis import CREDIT_READS, read_note, suspects
    from ..ledger import load_credits, load_policy, load_records, load_replay

    credits = load_credits(a.run_dir)
    if credits is None:
        raise ValueError(f"{a.run_dir}: no credits.json (a counterfactual ledger or a run from before per-pair credit); "
                         "suspects needs an in-training run of SMDACallback.")
    df = suspects(load_records(a.run_dir), load_policy(a.run_dir), credits, a.target, a.top, read=a.read,
                  replay=load_replay(a.run_dir) if a.read == "replay" else None)
    if a.json:
        print(json.dumps(df.drop(columns=["hash"]).to_dict("records"), indent=1, default=float))
        return 0
    print(f"pairs ranked by {a.target} (credit rule {credits['rule']}, kernel {credits['kernel']['kind']}, "
          f"measure {credits['measure']}); score = credited change, most suspect first.\n{CREDIT_READS}")
    for line in read_note(df):
        print(line)
    for r in df.itertuples():
        worst = f" (in {r.worst_category})" if "worst_category" in df.columns else ""
        print(f"{r.score:+.4f}{worst}  #{r.index} [{r.label}/{r.category}] {str(r.prompt)[:80]}")
    return 0


def _replay_spacing(p: argparse.ArgumentParser) -> None:
    """The replay's two checkpoint spacings, the same for every command that runs the replay."""
    p.add_argument("--replay-every", type=int, default=4, help="checkpoint spacing of the replay (memory holds this many + 1 states)")
    p.add_argument("--replay-outer", type=int, default=None,
                   help="disk checkpoint spacing of the replay, a multiple of --replay-every (default: the same); "
                        "larger needs less disk (about steps/outer + outer/every states) and runs the forward steps "
                        "three times instead of twice")


def _check_replay_spacing(a: argparse.Namespace) -> None:
    """A bad spacing is refused before hours of training or retraining, not after."""
    if a.replay:
        from ..lab.replay import checkpoint_plan
        checkpoint_plan(1, 0, a.replay_every, a.replay_outer)


def _poison(a: argparse.Namespace) -> int:
    from ..lab.poison import PoisonSettings, format_pool, format_poison, pool_poison, run_poison, score_poison

    if a.pool:
        pooled = pool_poison(a.pool)
        return _emit(a, pooled, format_pool(pooled))
    _check_replay_spacing(a)
    st = PoisonSettings(n_base=a.n_base, seed=a.seed, measure=a.measure, peers=tuple(a.peers), order_seed=a.order_seed,
                        replay=a.replay, replay_every=a.replay_every, replay_outer=a.replay_outer, every=a.every,
                        scorer=a.scorer, verify=a.verify)
    res = score_poison(a.out, st) if a.score_only else run_poison(a.out, st, train=not a.peers_only)
    return _emit(a, res, format_poison(res) + f"\n\nwritten: {Path(a.out) / 'poison.json'}")


def _causal(a: argparse.Namespace) -> int:
    from ..lab.causal import insert_vs_omit

    res = insert_vs_omit(a.run_dir, a.pairs, a.n, a.horizon, a.out, probes_file=a.probes)
    return _emit(a, res, json.dumps(res["summary"], indent=1, default=float) + "\nreplayed run vs ledger, max |Δ harmless "
                 f"refusal|: {res['replay_vs_ledger_harmless_abs_diff_max']:.2e}")


def _features(a: argparse.Namespace) -> int:
    from ..features import KINDS, format_card, load_cards
    from ..sae import embedded_sae_dir, feature_url, load_sae, sae_identity

    sae_dir = a.sae or str(embedded_sae_dir())
    if a.measure_kinds:
        from ..lab.cards import add_behaviour_kinds
        from ..lab.models import load_model

        model, tok = load_model(a.model)
        model.eval()
        counts = add_behaviour_kinds(sae_dir, model, tok)
        return _emit(a, counts, f"behaviour statistics written to {sae_dir}/feature_cards.json; kinds now: " +
                     ", ".join(f"{k} {v}" for k, v in counts.items()))
    cards = load_cards(sae_dir)
    if not cards:
        raise ValueError(f"{sae_dir}: no feature_cards.json next to this SAE (`smda train-sae` writes one).")
    ids = [int(str(i).lstrip("f")) for i in a.ids]
    if a.run:
        from ..ledger import load_policy

        ids += [int(j) for j in load_policy(a.run)["features"]]
    identity = sae_identity(load_sae(sae_dir), sae_dir)
    if not ids:
        live = [c for c in cards.values() if c["label"] != "dead"]
        counts = {k: sum(c["kind"] == k for c in live) for k in KINDS}
        return _emit(a, {"latents": len(cards), "dead": len(cards) - len(live), "kinds": counts, "sae": identity},
                     f"{len(cards)} latents, {len(cards) - len(live)} dead; kinds: " +
                     ", ".join(f"{k} {v}" for k, v in counts.items()) +
                     "\nsmda features ID [ID ...] prints cards; --run RUN_DIR prints the cards of that run's policy features")
    bad = [j for j in ids if j not in cards]
    if bad:
        raise ValueError(f"latent {bad[0]} is out of range (the SAE has {len(cards)} latents)")
    urls = {j: feature_url(identity, j) for j in ids}
    text = "\n\n".join(format_card(j, cards[j], a.top) + (f"\n  page: {urls[j]}" if urls[j] else "") for j in ids)
    return _emit(a, [{"id": j, **cards[j], "url": urls[j]} for j in ids], text)


def _curate(a: argparse.Namespace) -> int:
    from ..lab.curate import curate, greedy_answers, write_pairs
    from ..lab.demo import DATA, load_pairs

    pairs = load_pairs(a.pairs or DATA / "pairs.jsonl")
    answer = None
    if a.fix:
        from ..lab.models import load_model

        model, tok = load_model(a.model)
        answer = lambda prompts: greedy_answers(model, tok, prompts)  # noqa: E731
    out, changes = curate(a.run_dir, pairs, a.target, a.fix or a.drop, "fix" if a.fix else "drop", answer=answer)
    write_pairs(a.output, out)
    lines = [f"{c['action']:7s} {c['id']} (score {c['score']:+.4f}) {c['prompt'][:70]!r}\n         {c['why']}" for c in changes]
    lines.append(f"{len(pairs)} → {len(out)} pairs ({sum(c['action'] == 'fixed' for c in changes)} fixed) written to {a.output}")
    return _emit(a, {"changes": changes, "n_before": len(pairs), "n_after": len(out), "output": a.output}, "\n".join(lines))


def _attribute(a: argparse.Namespace) -> int:
    from ..config import SMDAConfig
    from ..lab.counterfactual import attribute_pairs
    from ..lab.demo import DATA, load_pairs
    from ..lab.models import load_model
    from ..probes import ProbeSet
    from ..sae import embedded_sae_dir

    model, tok = load_model(a.model)
    cfg = SMDAConfig.paper() if a.preset == "paper" else SMDAConfig()
    pairs = load_pairs(a.pairs or DATA / "pairs.jsonl", a.limit)
    probes = ProbeSet.from_jsonl(a.probes or DATA / "probes.jsonl")
    out = attribute_pairs(model, tok, pairs, probes, a.sae or embedded_sae_dir(), a.out, cfg, lr=a.lr)
    return _emit(a, {"ledger": str(out)}, f"counterfactual ledger written to {out}; `smda report {a.out}` renders it")


def _validate(a: argparse.Namespace) -> int:
    from ..lab.validation import CausalSettings, ValidationSettings, format_validation, plot_validation, run_validation

    st = ValidationSettings(seeds=tuple(range(a.seeds)), causal=CausalSettings(n_each=a.causal_pairs),
                            counterfactual_pairs=a.counterfactual_pairs or None)
    res = run_validation(a.run, a.out, st)
    md = format_validation(res)
    md += "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plot_validation(res, a.out))
    (Path(a.out) / "validation.md").write_text(md + "\n", encoding="utf-8")
    return _emit(a, res, md + f"\n\nwritten: {Path(a.out) / 'validation.json'}, {Path(a.out) / 'validation.md'}")


def _policy_check(a: argparse.Namespace) -> int:
    from ..config import SMDAConfig
    from ..lab.demo import DATA
    from ..lab.models import load_model
    from ..lab.policy_check import format_policy_check, policy_check
    from ..probes import ProbeSet
    from ..sae import embedded_sae_dir

    cfg = SMDAConfig(scorer=a.scorer, feature_kinds=tuple(a.kinds), n_features=a.n_features, selection=a.selection,
                     pooling=a.pooling)
    if a.select_model and not a.select_on:
        raise ValueError("--select-model needs --select-on: it names the model that reads the --select-on prompts.")
    model, tok = load_model(a.model)
    select_model = None
    if a.select_model:
        select_model = load_model(None if a.select_model == "embedded" else a.select_model)
    res = policy_check(model, tok, a.sae or embedded_sae_dir(), ProbeSet.from_jsonl(a.probes or DATA / "probes.jsonl"),
                       ProbeSet.from_jsonl(a.heldout or DATA / "heldout.jsonl"), cfg, a.fold_seeds, a.sweep,
                       selection_set=ProbeSet.from_jsonl(a.select_on) if a.select_on else None,
                       select_model=select_model, counts=tuple(a.counts))
    return _emit(a, res, format_policy_check(res))


def _retrain(a: argparse.Namespace) -> int:
    from ..lab.demo import DATA, load_pairs
    from ..probes import ProbeSet
    from ..lab.retrain import RetrainSettings, format_summary, parse_shard, reuse_ranking_run, run_jobs, summarize

    if not a.summary_only:
        st = RetrainSettings(target=a.target, ns=tuple(a.n), orders=tuple(a.orders), random_sets=a.random_sets,
                             paper_rule=not a.no_paper_rule)
        sets = {"probes": ProbeSet.from_jsonl(DATA / "probes.jsonl"), "heldout": ProbeSet.from_jsonl(a.heldout or DATA / "heldout.jsonl")}
        pairs = load_pairs(a.pairs or DATA / "pairs.jsonl")
        if a.reuse_run_answers and reuse_ranking_run(a.run_dir, pairs, a.out, a.orders[0]) is None:
            raise SystemExit(f"--reuse-run-answers: {a.run_dir} has no after-training answers for {len(pairs)} steps")
        run_jobs(a.run_dir, pairs, sets, a.out, st, parse_shard(a.shard))
    s = summarize(a.out)
    Path(a.out, "summary.json").write_text(json.dumps(s, indent=1), encoding="utf-8")
    return _emit(a, s, format_summary(s) + f"\n\nwritten: {Path(a.out) / 'summary.json'}")


def _lds(a: argparse.Namespace) -> int:
    from ..lab.files import write_json
    from ..lab.lds import LDSSettings, has_segments, peer_jobs, replay_job, replay_reader, run_jobs
    from ..lab.lds_score import format_score, keep, score
    from ..lab.retrain import parse_shard

    _check_replay_spacing(a)
    st = LDSSettings(n_pairs=a.n_pairs, subsets=a.subsets, drop_fracs=tuple(a.drop_fracs), seed=a.seed,
                     replicas=a.replicas, ranking_run=a.ranking_run, leave_out=tuple(a.leave_out),
                     keep_schedule=a.keep_schedule, orders=a.orders, measure=a.measure)
    if a.replay_last is not None and a.replay_last < 1:  # refused before any retrain, not after hours of them
        raise ValueError(f"--replay-last {a.replay_last}: give a number of steps ≥ 1 (the run's last steps to replay).")
    from ..credit.replay import ReplayVariant, Segment
    try:
        variant = ReplayVariant(a.replay_second_moment, not a.replay_no_curvature, a.replay_eps, a.replay_layers)
    except ValueError as e:  # argparse has checked the other fields' types and choices: only ε can be refused here
        raise ValueError(f"--replay-eps {a.replay_eps}: {str(e).removeprefix('replay: ')}") from None
    segment = None
    if a.replay_exact_until:
        if a.replay_last is not None:
            raise ValueError("--replay-exact-until reads the whole run's early pairs: drop --replay-last.")
        if max(a.replay_exact_until) > a.n_pairs:
            raise ValueError(f"--replay-exact-until {max(a.replay_exact_until)}: the run has {a.n_pairs} steps; choose "
                             f"steps ≤ {a.n_pairs}.")
        try:
            segment = Segment(tuple(a.replay_exact_until), a.replay_exact_below)
        except ValueError as e:
            raise ValueError(f"--replay-exact-until/--replay-exact-below: {str(e).removeprefix('replay: ')}") from None
    elif a.replay_exact_below is not None:
        raise ValueError("--replay-exact-below needs --replay-exact-until (where the exact stretch ends).")
    if a.replay and a.replay_layers:  # the replay's own rule (kept_blocks), on the embedded model built without weights
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..credit.replay import kept_blocks
        from ..lab.models import embedded_model_dir
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(embedded_model_dir()))
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        try:
            kept_blocks(m, [n for n, _ in named], [p for _, p in named], a.replay_layers)
        except ValueError as e:
            raise ValueError(f"--replay-layers {a.replay_layers}: {str(e).removeprefix('replay: ')}") from None
    if not a.score_only:
        run_jobs(a.out, st, parse_shard(a.shard))
    written = Path(a.out, replay_reader(variant, a.replay_last)[1])
    if a.replay and (not written.exists() or not has_segments(json.loads(written.read_text()), segment)):
        replay_job(a.out, st, every=a.replay_every, outer=a.replay_outer, last=a.replay_last, variant=variant, segment=segment)
    if a.peers:
        peer_jobs(a.out, tuple(a.peers), st)
    s = score(a.out, a.against)
    Path(a.out, "lds.json").write_text(json.dumps(s, indent=1), encoding="utf-8")
    if a.keep:
        write_json(a.keep, keep(a.out, s, a.command, a.against))
    return _emit(a, s, format_score(s) + (f"\n\nkept: {a.keep}" if a.keep else ""))


def _lds_runs(a: argparse.Namespace) -> int:
    from ..lab.lds_runs import compare, format_runs, load_run

    runs = [load_run(f) for f in a.files]
    if a.reader and not any(a.reader in r["lds"] for r in runs):
        names = sorted({n for r in runs for n in r["lds"]})
        raise ValueError(f"--reader {a.reader!r}: no given file scores it; readers in them: {', '.join(names)}")
    cmp = compare(runs, a.reader, a.margin, tuple(a.at))
    return _emit(a, {"runs": runs, "compare": cmp}, format_runs(runs, cmp, a.rows))


def _train_sae(a: argparse.Namespace) -> int:
    from ..lab.sae_train import SAETrainSpec, train_sae

    spec = SAETrainSpec(layer=a.layer, d_sae=a.d_sae, k=a.k, tokens=a.tokens, epochs=a.epochs, seed=a.seed)
    rec = train_sae(Path(a.out), spec, a.model)
    return _emit(a, rec, json.dumps(rec["quality"], indent=1))


def build_parser() -> argparse.ArgumentParser:
    from ..config import KINDS, SMDAConfig
    from ..lab.specs import PEERS, REMOVAL_READER, SECOND_MOMENTS, SUSPECT_READS, SAETrainSpec

    p = argparse.ArgumentParser(prog="smda", description="Symbolic Mechanistic Data Attribution for HF Trainer runs.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="safety-SFT the embedded model with SMDACallback and print the findings")
    d.add_argument("--pairs", help="SFT pairs JSONL (prompt, response, label, category)")
    d.add_argument("--probes", help="probe JSONL (prompt, label, category)")
    d.add_argument("--limit", type=int, help="train on the first N pairs only (quick run)")
    d.add_argument("--out", "-o", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--on-alert", choices=["warn", "halt"], default="warn")
    d.add_argument("--epochs", type=float, default=1.0)
    d.add_argument("--learning-rate", "--lr", type=float, help="learning rate (default: DemoSettings, see docs/demo.md)")
    d.add_argument("--scorer", choices=["first_token", "prefix"], default="first_token")
    d.add_argument("--every-n-steps", "--every", type=int, default=1,
                   help="SMDAConfig.every_n_steps: snapshot every N optimizer steps (window credit; default 1 = per pair)")
    d.add_argument("--replay-last", type=int, default=0, metavar="K",
                   help="SMDAConfig.replay_last_steps: after training, replay the last K steps (smda/replay.json; "
                        "`smda suspects --read replay`); costs many training steps per replayed step")
    d.add_argument("--credit-measure", "--measure", choices=["deconvolve", "ghost"], default="deconvolve",
                   help="SMDAConfig.credit_measure: deconvolve (default) reads each pair's own change off consecutive "
                        "probe passes; ghost measures it with one extra probe pass per step (needs --every 1)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--skip-answers", action="store_true", help="skip the greedy-answer refusal check before and after")
    d.set_defaults(fn=_demo)

    pr = sub.add_parser("probe", help="score a probe file on a model (refusal per probe and category)")
    pr.add_argument("--model", help=MODEL_HELP)
    pr.add_argument("--probes", help="probe JSONL (default: the shipped probe set)")
    pr.add_argument("--policy", help="RUN_DIR/smda/policy.json: also report the policy's predictions and AUROC")
    pr.add_argument("--sae", help="SAE folder (default: the shipped SAE; must be the policy's)")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--generate", action="store_true", help="greedy answers instead of scores: refusal rate by regex")
    pr.set_defaults(fn=_probe)

    r = sub.add_parser("report", help="write a self-contained HTML report of a run")
    r.add_argument("run_dir")
    r.add_argument("-o", "--output", "--out", help="output HTML path (default RUN_DIR/smda/report.html)")
    r.set_defaults(fn=_report)

    su = sub.add_parser("suspects", help="pairs ranked by what they did to a behaviour (over-refusal, compliance, ...)")
    su.add_argument("run_dir")
    su.add_argument("--target", required=True, help="over-refusal | compliance | off-target | a probe category name")
    su.add_argument("--top", type=int, default=20)
    su.add_argument("--read", choices=SUSPECT_READS, default="trained",
                    help="trained: what the pair's own steps did when applied (default); end: that, carried to the end "
                         "of the run by the run's forgetting rate; removal: that, carried by the run's second-order "
                         "response (a free prediction of what leaving the pair out changes at the end); replay: the "
                         "run's replay of its last steps (SMDAConfig(replay_last_steps=K), replay.json); category: the "
                         "pair's credited change in the probe category it moved most the wrong way (named in the "
                         "output); end, removal, replay and category: over-refusal and compliance only")
    su.add_argument("--json", action="store_true", help="a JSON list, most suspect first")
    su.set_defaults(fn=_suspects)

    po = sub.add_parser("benchmark-poison", help="plant bad pairs among demo pairs; which reader ranks them first?")
    po.add_argument("--out", "-o", default="runs/poison")
    po.add_argument("--n-base", type=int, default=96, help="demo pairs mixed with the plants")
    po.add_argument("--seed", type=int, default=0, help="the planting: which demo pairs are mixed with the plants")
    po.add_argument("--order-seed", type=int, default=None,
                    help="the training run's seed (the Trainer's shuffle): another data order of the same planting "
                         "(default: --seed)")
    po.add_argument("--measure", choices=["ghost", "deconvolve"], default="ghost")
    po.add_argument("--every", type=int, default=1, metavar="N",
                    help="one probe pass every N steps (SMDAConfig.every_n_steps): the same training, a cheaper callback")
    po.add_argument("--scorer", choices=["first_token", "prefix"], default=None,
                    help="the run's refusal scorer (SMDAConfig.scorer; default: the demo's first_token). prefix reads "
                         "three tokens of each opening, so 'I can't' and 'I'd be happy' count apart; costs more per probe pass")
    po.add_argument("--peers", nargs="*", choices=list(PEERS), default=list(PEERS),
                    help="other readers run after training, each in its own process (kronfluence needs the [bench] extra)")
    po.add_argument("--peers-only", action="store_true", help="keep the finished run in --out; run the peers not yet in --out (and --verify) and score; without it --out must hold no finished run")
    po.add_argument("--verify", type=int, default=None, metavar="K",
                    help="also retrain the run's order without each plant, and without K ordinary pairs of each label "
                         "(controls), one at a time: what each plant left in the tuned model; scored over the plants that "
                         "acted as intended beyond every control (one plain SFT + probe pass per retrain, under --out/verify)")
    po.add_argument("--replay", action="store_true",
                    help="also the replay reader after training (reverse mode through the run's recorded order, "
                         "lab/replay.py; the same --seed/--order-seed as the run; checkpoints ≈ 1.6 GB per "
                         "--replay-every steps of the 135M model on disk while it runs)")
    _replay_spacing(po)
    po.add_argument("--score-only", action="store_true", help="re-score a finished run in --out without training")
    po.add_argument("--pool", nargs="+", metavar="DIR", help="only pool finished runs (other plantings / data orders, "
                                                              "each made with --out DIR --seed S), or their kept poison.json "
                                                              "files (benchmarks/poison/): AUROC over all their plants")
    po.set_defaults(fn=_poison)

    ca = sub.add_parser("causal", help="insert vs omit pairs at their place in the same optimizer; compare with credits")
    ca.add_argument("run_dir", help="a finished one-pair-per-step run (e.g. runs/poison/run)")
    ca.add_argument("--pairs", required=True, help="the pairs JSONL that run trained on")
    ca.add_argument("--n", type=int, default=30, help="pairs tested, evenly spaced over the run")
    ca.add_argument("--horizon", type=int, default=20, help="steps after the pair before both branches are probed")
    ca.add_argument("--probes", help="the probe set the run used (default: the shipped one)")
    ca.add_argument("--out", "-o", default="runs/causal")
    ca.set_defaults(fn=_causal)

    fe = sub.add_parser("features", help="feature cards: top activating contexts, label and kind of SAE latents")
    fe.add_argument("ids", nargs="*", help="latent ids (123 or f123)")
    fe.add_argument("--top", type=int, default=10, help="contexts per card")
    fe.add_argument("--run", help="also print the cards of this run's policy features")
    fe.add_argument("--sae", help="SAE folder (default: the shipped SAE)")
    fe.add_argument("--measure-kinds", action="store_true",
                    help="measure where each latent fires (first positions, chat template) on the shipped texts and store "
                         "it in the SAE's feature_cards.json (the position and template kinds)")
    fe.add_argument("--model", help="model for --measure-kinds (default: the embedded model)")
    fe.set_defaults(fn=_features)

    cu = sub.add_parser("curate", help="drop or fix the pairs most suspect for a behaviour (writes a new pairs file)")
    cu.add_argument("run_dir")
    cu.add_argument("--target", required=True, help="over-refusal | compliance | off-target | a probe category")
    how = cu.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop", type=int, help="drop the N most suspect pairs")
    how.add_argument("--fix", type=int, help="replace the responses of the N most suspect harmless pairs by the base model's answers")
    cu.add_argument("--pairs", help="the pairs file the run trained on (default: the shipped pairs)")
    cu.add_argument("--model", help="base model for --fix (default: the embedded model)")
    cu.add_argument("-o", "--output", "--out", required=True)
    cu.set_defaults(fn=_curate)

    at = sub.add_parser("attribute", help="the paper's counterfactual protocol: one SGD step per pair from the same base")
    at.add_argument("--pairs")
    at.add_argument("--probes")
    at.add_argument("--out", "-o", default="runs/counterfactual")
    at.add_argument("--model")
    at.add_argument("--sae")
    at.add_argument("--preset", choices=["paper", "default"], default="paper")
    at.add_argument("--lr", type=float, default=1e-4)
    at.add_argument("--limit", type=int)
    at.set_defaults(fn=_attribute)

    v = sub.add_parser("validate", help="agreement, curation experiment and causal check on a full demo run")
    v.add_argument("--run", default="runs/demo", help="the in-training run to validate (a full `smda demo`)")
    v.add_argument("--out", "-o", default="runs/validate")
    v.add_argument("--seeds", type=int, default=3, help="data orders (and random removal sets) in the curation experiment")
    v.add_argument("--causal-pairs", type=int, default=10, help="highest and lowest predicted pairs per category")
    v.add_argument("--counterfactual-pairs", type=int, default=0, help="only the first N pairs get the counterfactual protocol (0 = all)")
    v.set_defaults(fn=_validate)

    pc = sub.add_parser("policy-check", help="does the baseline policy generalise? nested CV and held-out prompts")
    pc.add_argument("--sae", help="SAE folder (default: the shipped one)")
    pc.add_argument("--model", help=MODEL_HELP)
    pc.add_argument("--probes", help="probe JSONL (default: the shipped probes)")
    pc.add_argument("--heldout", help="held-out prompts JSONL (default: the shipped heldout.jsonl)")
    pc.add_argument("--feature-kinds", "--kinds", dest="kinds", nargs="+", default=list(SMDAConfig.feature_kinds), choices=list(KINDS),
                    help="latent kinds the policy may use (default: the callback's)")
    pc.add_argument("--n-features", type=int, default=SMDAConfig.n_features, help="policy features (default: the callback's)")
    pc.add_argument("--selection", choices=["score", "stable"], default=SMDAConfig.selection)
    pc.add_argument("--pooling", choices=["mean", "max", "last", "eot"], default=SMDAConfig.pooling,
                    help="how a prompt's per-token codes become one row of X (default: the callback's)")
    pc.add_argument("--fold-seeds", type=int, default=3, help="fold splits the nested estimate is averaged over")
    pc.add_argument("--scorer", choices=["first_token", "prefix"], default="first_token",
                    help="refusal scorer: the demo's first_token (default here) or the library default prefix")
    pc.add_argument("--sweep", action="store_true", help="also every feature count (16–64) × selection rule, with the "
                                                         "agreement of the latents chosen on different folds")
    pc.add_argument("--counts", type=int, nargs="+", default=[16, 24, 32, 48, 64], help="feature counts of --sweep")
    pc.add_argument("--select-on", metavar="JSONL",
                    help="choose the features on these labelled prompts instead of the probes (e.g. the training pairs, "
                         "smda_callback/data/pairs.jsonl); the probes then only fit the policy")
    pc.add_argument("--select-model", metavar="MODEL",
                    help="the model whose codes of --select-on choose the features (default: --model; 'embedded' for "
                         "the base model, what a run has when it starts)")
    pc.add_argument("--json", action="store_true")
    pc.set_defaults(fn=_policy_check)

    r = sub.add_parser("retrain-experiment", help="retrain from the base minus top suspects vs minus random pairs, over several data orders")
    r.add_argument("run_dir", help="the ranking run: a full in-training run of the pairs (e.g. runs/demo)")
    r.add_argument("--pairs", help="the pairs that run trained on (default: the demo's)")
    r.add_argument("--heldout", help="held-out prompts JSONL (default: the shipped heldout.jsonl)")
    r.add_argument("--out", "-o", default="runs/retrain")
    r.add_argument("--target", default="over-refusal", help="over-refusal | compliance | off-target | a probe category")
    r.add_argument("--n", type=int, nargs="+", default=[32], help="removal sizes (a sweep)")
    r.add_argument("--orders", type=int, nargs="+", default=[0, 1, 2], help="data-order seeds for every condition")
    r.add_argument("--random-sets", type=int, default=3)
    r.add_argument("--no-paper-rule", action="store_true", help="skip the paper's median-rule condition")
    r.add_argument("--shard", default="0/1", help="i/k: run every k-th job from the i-th, to share the jobs between processes; "
                   + SHARD_THREADS)
    r.add_argument("--summary-only", action="store_true", help="only summarise the finished jobs in --out")
    r.add_argument("--reuse-run-answers", action="store_true",
                   help="the ranking run is the demo on these pairs in the first order: use its answers as a_all")
    r.set_defaults(fn=_retrain)

    ld = sub.add_parser("benchmark-lds", help="linear datamodeling score: does a pair's credit predict retraining without it?")
    ld.add_argument("--out", "-o", default="runs/lds")
    ld.add_argument("--n-pairs", type=int, default=64, help="shipped pairs in the ranking run (one optimizer step each)")
    ld.add_argument("--subsets", type=int, default=40, help="random removal subsets, each one retrain")
    ld.add_argument("--drop-fracs", type=float, nargs="+", default=[0.05, 0.10], help="share of pairs each subset drops (cycled)")
    ld.add_argument("--seed", type=int, default=0, help="the ranking run's Trainer seed (its data order) and the subsets' draws")
    ld.add_argument("--ranking-run", metavar="DIR", help="a finished `smda benchmark-poison --out DIR` (pairs.jsonl and run/) as "
                    "the ranking run, e.g. LDS on a run with planted pairs; --seed must be its training seed (its --order-seed); "
                    "its replay.json and peers/ are reused")
    ld.add_argument("--leave-out", nargs="+", default=[], metavar="ID",
                    help="also retrain without each of these pairs alone (the exact single-pair counterfactual of the order); "
                         "'all': every pair of the run, and their summed single removals are scored as a reader")
    ld.add_argument("--keep-schedule", action="store_true",
                    help="each kept pair trains at the learning rate of its place in the full run (dropping a warm-up "
                         "pair then changes no other pair's rate); retrains with and without it need separate --out")
    ld.add_argument("--replicas", type=int, default=2, help="retrains on all pairs (two: the bitwise check; one: the reference only)")
    ld.add_argument("--orders", type=int, default=1,
                    help="retrain every subset in this many data orders (0: the ranking run's; others fixed permutations of "
                         "its pairs), for the noise ceiling across runs; e.g. 3 with --drop-fracs 0.5")
    ld.add_argument("--measure", choices=["deconvolve", "ghost"], default="deconvolve",
                    help="the ranking run's credit measure; ghost (one extra probe pass per step) is scored beside the "
                         "default, which is replayed from its ledger")
    ld.add_argument("--shard", default="0/1", help="i/k: run every k-th job from the i-th (shard 0 makes the ranking run); "
                    + SHARD_THREADS)
    ld.add_argument("--score-only", action="store_true", help="only score the finished jobs in --out")
    ld.add_argument("--replay", action="store_true",
                    help="also the replay reader: reverse mode through the ranking run's order (lab/replay.py; "
                         "about 17 retrains' compute on the 64-pair demo run, checkpoints on disk under --out)")
    _replay_spacing(ld)
    ld.add_argument("--replay-second-moment", choices=list(SECOND_MOMENTS), default="exact",
                    help="exact: Adam's second moment answers each removal as in the run (replay.json); fixed: it is the "
                         "recorded one at every step, a fixed preconditioner (replay_fixed_v.json); both are scored when present")
    ld.add_argument("--replay-no-curvature", action="store_true",
                    help="the replay without Hessian-vector products: every step's gradient held at the recorded one "
                         "(one plain backward per replayed step instead of a double one; *_nocurv*.json)")
    ld.add_argument("--replay-eps", type=float, default=0.0, metavar="EPS",
                    help="the damped replay: its reverse pass linearises AdamW with ε raised to EPS where the run's is "
                         "smaller (the steps are taken as trained; *_eps<EPS>*.json). 0: the exact replay")
    ld.add_argument("--replay-layers", type=int, default=0, metavar="L",
                    help="the replay linearised in the model's last L transformer blocks only (and the final norm; "
                         "the embedding and the rest follow the recorded run): its double backward stops there "
                         "(*_layers<L>*.json); L < 0: the first |L| blocks alone (*_first<|L|>*.json). 0: every parameter")
    ld.add_argument("--replay-last", type=int, default=None, metavar="K",
                    help="replay only the run's last K steps (earlier pairs read 0), as SMDAConfig(replay_last_steps=K) "
                         "does in the user's run (replay_last<K>.json, scored beside the whole run's replay)")
    ld.add_argument("--replay-exact-until", type=int, nargs="+", default=[], metavar="E",
                    help="with --replay: the early pairs' removals also taken exactly up to step E (their retrain stepped "
                         "to E), then carried to the end by the replay (one reader per E; Σ (E − s − 1) plain steps over the "
                         "early pairs s; E = the run's length: each early pair retrained whole, its objective evaluated; "
                         "credit/replay.py Segment)")
    ld.add_argument("--replay-exact-below", type=int, default=None, metavar="W",
                    help="the pairs of steps 0..W−1 are the early ones (default: the warm-up, steps whose lr is below its peak)")
    ld.add_argument("--against", metavar="FILE",
                    help="score against the retrains kept in FILE (benchmarks/lds/*.json) instead of --out's own: a ranking "
                         "run trained again on a new machine, read on the first one's retrains (its order must be theirs)")
    ld.add_argument("--peers", nargs="*", choices=list(PEERS), default=[],
                    help="also these peer readers at the ranking run's final weights (TracIn, kronfluence EK-FAC)")
    ld.add_argument("--keep", metavar="FILE",
                    help="also write what the scores were computed from to FILE (settings, order, subsets, each retrain's "
                         "measured refusal, every reader's per-pair scores, the score; pair ids, no text; benchmarks/lds/)")
    ld.add_argument("--json", action="store_true")
    ld.set_defaults(fn=_lds)

    lr = sub.add_parser("lds-runs", help="the readers of several kept LDS runs side by side (benchmarks/lds/*.json)")
    lr.add_argument("files", nargs="+", help="kept files of `smda benchmark-lds --keep` (one per ranking run), or its "
                                             "scored output folders (-o DIR)")
    lr.add_argument("--reader", default=REMOVAL_READER,
                    help="the reader compared with the best free one on each run (default: what --read removal reads)")
    lr.add_argument("--margin", type=float, default=0.05, help="'within' means the mean of the two LDS is at most this below the best's")
    lr.add_argument("--at", nargs="+", type=float, default=[0.39, 0.6], metavar="LDS",
                    help="count the runs where --reader reaches each of these on both quantities (compared unrounded)")
    lr.add_argument("--rows", nargs="+", metavar="READER", help="only these readers as table rows")
    lr.set_defaults(fn=_lds_runs)

    t = sub.add_parser("train-sae", help="retrain the shipped SAE (restartable: corpus and activations are cached)")
    t.add_argument("--out", "-o", default="runs/sae", help="where the new SAE goes (copy it over smda_callback/data/sae to ship it)")
    t.add_argument("--model", help=MODEL_HELP)
    t.add_argument("--layer", type=int, default=15)
    t.add_argument("--d-sae", type=int, default=4096)
    t.add_argument("--k", type=int, default=SAETrainSpec.k)
    t.add_argument("--tokens", type=int, default=500_000)
    t.add_argument("--epochs", type=int, default=SAETrainSpec.epochs)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_train_sae)
    for sp in sub.choices.values():  # every command that prints results can print them as JSON
        try:
            sp.add_argument("--json", action="store_true", help="print the result as JSON (nothing else on stdout)")
        except argparse.ArgumentError:
            pass  # the command defines its own --json
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = "smda " + " ".join(shlex.quote(x) for x in argv)  # as typed, for the files that record it
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"smda: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
