"""The replay's adjoint is the derivative of the end of the run: checked by finite differences in float64."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smda_callback.lab.replay import (ReplayVariant, State, Stepper, checkpoint_plan, effect_parts, removal_effect,
                                      replay)


def _trainer(tok, tmp_path, clip: float, wd: float, optim: str = "adamw_torch", lr: float = 3e-3):
    from trl import SFTConfig, SFTTrainer

    from smda_callback.lab.demo import to_dataset
    from smda_callback.lab.testing import tiny_model

    pairs = [{"id": f"p{i}", "prompt": f"question {i} about {w}", "response": f"answer {w} {i}", "label": "harmless",
              "category": "c"} for i, w in enumerate(["boats", "fire", "rain", "ink", "salt", "moss"])]
    model = tiny_model(hidden=32, layers=2, seed=1).double()
    args = SFTConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=1, learning_rate=lr, max_grad_norm=clip,
                     weight_decay=wd, lr_scheduler_type="constant_with_warmup", warmup_steps=2, report_to=[], use_cpu=True,
                     save_strategy="no", max_length=64, optim=optim, train_sampling_strategy="sequential")
    return SFTTrainer(model=model, args=args, train_dataset=to_dataset(pairs), processing_class=tok, compute_loss_func=_ce64)


def _ce64(outputs, labels, num_items_in_batch=None):
    """TRL's default loss computes log-probabilities in float32 even for a float64 model; finite differences
    need the whole step in float64, so the runs here use the same mean token cross-entropy in the model's dtype."""
    logits, tgt = outputs.logits[:, :-1], labels[:, 1:]
    mask = tgt != -100
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(lp * mask).sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)


def _objective(tok):
    ids = torch.tensor([tok("Tell me how to pick a lock")["input_ids"]])
    refusal = tok(" I", add_special_tokens=False)["input_ids"][0]

    def f(model):
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)[refusal]

    return f


def _accumulate(run, mode: str) -> None:
    """Two batches per step, as gradient accumulation of 2 takes them: `mean` (each micro-batch's mean loss halved) or
    `tokens` (summed over the labels of both and divided by their count: the Trainer's num_items_in_batch). The second
    micro-batch keeps its last 2 label tokens only, so that the two rules weigh the micro-batches differently."""
    steps = [run.batches[i] + run.batches[i + 1] for i in range(0, len(run.batches) - 1, 2)]
    for _, second in steps:  # micro-batches of unequal weight: the second keeps 2 label tokens, so the two rules differ
        labels = second["labels"].clone()
        kept = (labels != -100).nonzero()[:-2]
        labels[kept[:, 0], kept[:, 1]] = -100
        second["labels"] = labels
    if mode == "tokens":
        for micro in steps:
            n = torch.tensor(sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro))
            for mb in micro:
                mb["num_items_in_batch"] = n
    run.batches = steps


def _recorded(tok, tmp_path, clip: float, wd: float, optim: str = "adamw_torch", accumulate: str | None = None):
    """The objective, the run stepped through once, and its state before every step and after the last."""
    f = _objective(tok)
    run = Stepper(_trainer(tok, tmp_path, clip, wd, optim))
    if accumulate:
        _accumulate(run, accumulate)
    states = [run.state(0)]
    for t in range(len(run)):
        run.step(t)
        states.append(run.state(t + 1))
    return f, run, states


def _delta(post: State, gen: torch.Generator, scale: float = 1e-4) -> State:
    """A random perturbation of the state `post`: θ and m by `scale` of their mean size, v by a positive share of itself."""
    return State([torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * (p.abs().mean() + 1e-3) for p in post.theta],
                 [torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * (p.abs().mean() + 1e-9) for p in post.m],
                 [torch.rand(p.shape, generator=gen, dtype=p.dtype) * scale * p for p in post.v], post.step)


def _check_against_the_rest_of_the_run(rest, post: State, d: State, A, t: int, rel: float) -> None:
    """A·δ equals the central difference of `rest(θ, m, v, first step)`, the run from step t + 1 on, around `post`."""
    zero = State(*[[torch.zeros_like(p) for p in post.theta] for _ in range(3)], post.step)
    predicted = -removal_effect(zero, d, A)
    moved = [rest(*[[a + sg * x for a, x in zip(getattr(post, key), getattr(d, key))] for key in ("theta", "m", "v")], t + 1)
             for sg in (1.0, -1.0)]
    measured = (moved[0] - moved[1]) / 2
    assert abs(measured) > 1e-9
    assert predicted == pytest.approx(measured, rel=rel), (t, predicted, measured)


@pytest.mark.parametrize("clip,wd,optim,accumulate", [(1e-2, 0.1, "adamw_torch", None), (0.0, 0.0, "adamw_torch_fused", None),
                                                      (1e-2, 0.1, "adamw_torch", "mean"), (1e-2, 0.1, "adamw_torch", "tokens")])
def test_adjoint_matches_finite_differences_of_the_rest_of_the_run(smol_tokenizer, tmp_path, clip, wd, optim, accumulate):
    """A_t·δ from one reverse pass equals (f(run continued from S_t + εδ) − f(run continued from S_t)) / ε,
    for a random δ, at every step: Adam's moments and bias correction, decoupled weight decay, the clipping's
    norm (clip 1e-2 binds at every step) and the Hessian-vector products all enter that number. With gradient
    accumulation (two micro-batches of different lengths per step) under both of the Trainer's normalisations."""
    f, run, states = _recorded(smol_tokenizer, tmp_path, clip, wd, optim, accumulate)
    n = len(run)
    if accumulate:
        assert n == 3 and all(len(b) == 2 for b in run.batches)
    if clip:
        assert all(x > clip for x in run.norms)  # the clipping's term is exercised
    base = float(f(run.model))
    adj = {"f": {"theta": [g for g in torch.autograd.grad(f(run.model), run.params)],
                 "m": [torch.zeros_like(p) for p in run.params], "v": [torch.zeros_like(p) for p in run.params]}}
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for t in range(n - 1, -1, -1):
        # S_t = states[t+1] is the state after step t; perturb it and run steps t+1.. again
        post = states[t + 1]
        delta = State([torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-4 * (p.abs().mean() + 1e-3) for p in post.theta],
                      [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-4 * (p.abs().mean() + 1e-9) for p in post.m],
                      [torch.rand(p.shape, generator=gen, dtype=p.dtype) * 1e-4 * p for p in post.v],
                      post.step)
        zero = State([torch.zeros_like(p) for p in post.theta], [torch.zeros_like(p) for p in post.m],
                     [torch.zeros_like(p) for p in post.v], post.step)
        predicted = -removal_effect(zero, delta, adj["f"])  # A·δ
        moved = []
        for sign in (1.0, -1.0):
            run.load(State([a + sign * d for a, d in zip(post.theta, delta.theta)], [a + sign * d for a, d in zip(post.m, delta.m)],
                           [a + sign * d for a, d in zip(post.v, delta.v)], post.step))
            for u in range(t + 1, n):
                run.step(u)
            moved.append(float(f(run.model)))
        measured = (moved[0] - moved[1]) / 2
        assert abs(measured) > 1e-9
        assert predicted == pytest.approx(measured, rel=2e-3), (t, predicted, measured)
        checked += 1
        run.load(states[t])
        run.vjp(t, post, adj)
    assert checked == n
    assert abs(base) > 0


def test_fixed_second_moment_adjoint_is_the_derivative_of_the_run_with_v_held(smol_tokenizer, tmp_path):
    """second_moment="fixed": the adjoint of a run whose Adam second moment is the recorded one at every step. Checked
    by finite differences of exactly that run (AdamW written out with v read from the recording), perturbing θ and m
    at every step; clipping (binding) and weight decay on. Its effect parts are θ and m only."""
    import math

    f, run, states = _recorded(smol_tokenizer, tmp_path, 1e-2, 0.1)
    n = len(run)

    def held_v_run(theta, m, start):  # steps start.. of the run with v the recorded one
        with torch.no_grad():
            for p, x in zip(run.params, theta):
                p.copy_(x)
        m = [x.clone() for x in m]
        for u in range(start, n):
            run.model.zero_grad(set_to_none=True)
            run.loss(u).backward()
            g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
            norm = math.sqrt(sum(float((x * x).sum()) for x in g))
            coef = min(1.0, run.clip / (norm + 1e-6))
            lr, k = run.lrs[u], u + 1
            with torch.no_grad():
                for i, p in enumerate(run.params):
                    (b1, b2), eps, wd = run.hp[i]["betas"], run.hp[i]["eps"], run.hp[i]["wd"]
                    m[i].mul_(b1).add_((1 - b1) * coef * g[i])
                    D = states[u + 1].v[i].sqrt() / math.sqrt(1 - b2 ** k) + eps
                    p.mul_(1 - lr * wd).sub_((lr / (1 - b1 ** k)) * m[i] / D)
        return float(f(run.model))

    # the written-out run reproduces the recorded one (v is the run's own, so nothing differs)
    run.load(states[n])
    base = float(f(run.model))
    assert held_v_run(states[1].theta, states[1].m, 1) == pytest.approx(base, rel=1e-10)
    run.load(states[n])
    adj = {"f": {"theta": list(torch.autograd.grad(f(run.model), run.params)), "m": [torch.zeros_like(p) for p in run.params]}}
    gen = torch.Generator().manual_seed(1)
    for t in range(n - 1, -1, -1):
        post = states[t + 1]
        dth = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-4 * (p.abs().mean() + 1e-3) for p in post.theta]
        dm = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-4 * (p.abs().mean() + 1e-9) for p in post.m]
        zero = State([torch.zeros_like(p) for p in post.theta], [torch.zeros_like(p) for p in post.m], [], post.step)
        parts = effect_parts(zero, State(dth, dm, [], post.step), adj["f"])
        assert set(parts) == {"theta", "m"}
        predicted = -sum(parts.values())
        moved = [held_v_run([a + sg * d for a, d in zip(post.theta, dth)], [a + sg * d for a, d in zip(post.m, dm)], t + 1)
                 for sg in (1.0, -1.0)]
        measured = (moved[0] - moved[1]) / 2
        assert abs(measured) > 1e-9
        assert predicted == pytest.approx(measured, rel=2e-3), (t, predicted, measured)
        run.load(states[t])
        run.vjp(t, post, adj, ReplayVariant("fixed"))
    assert "v" not in adj["f"]


def test_no_curvature_adjoint_is_the_derivative_of_the_run_with_gradients_held(smol_tokenizer, tmp_path):
    """curvature=False: the adjoint of a run whose every gradient is the recorded one (no θ dependence: no Hessian).
    Checked by finite differences of exactly that run (AdamW written out, gradients and clipping factors read from
    the recording), perturbing θ, m and v at every step; clipping (binding) and weight decay on."""
    import math

    f, run, states = _recorded(smol_tokenizer, tmp_path, 1e-2, 0.1)
    n = len(run)
    recorded = []
    for u in range(n):  # each step's clipped gradient at the weights it was taken at
        run.load(states[u])
        run.model.zero_grad(set_to_none=True)
        run.loss(u).backward()
        g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in run.params]
        norm = math.sqrt(sum(float((x * x).sum()) for x in g))
        recorded.append([x * min(1.0, run.clip / (norm + 1e-6)) for x in g])

    def held_g_run(theta, m, v, start):
        th, m, v = [x.clone() for x in theta], [x.clone() for x in m], [x.clone() for x in v]
        for u in range(start, n):
            lr, k = run.lrs[u], u + 1
            for i in range(len(th)):
                (b1, b2), eps, wd = run.hp[i]["betas"], run.hp[i]["eps"], run.hp[i]["wd"]
                m[i] = b1 * m[i] + (1 - b1) * recorded[u][i]
                v[i] = b2 * v[i] + (1 - b2) * recorded[u][i] ** 2
                th[i] = th[i] * (1 - lr * wd) - (lr / (1 - b1 ** k)) * m[i] / (v[i].sqrt() / math.sqrt(1 - b2 ** k) + eps)
        with torch.no_grad():
            for p, x in zip(run.params, th):
                p.copy_(x)
        return float(f(run.model))

    run.load(states[n])
    base = float(f(run.model))
    assert held_g_run(states[1].theta, states[1].m, states[1].v, 1) == pytest.approx(base, rel=1e-9)  # nothing differs
    run.load(states[n])
    adj = {"f": {"theta": list(torch.autograd.grad(f(run.model), run.params)),
                 **{key: [torch.zeros_like(p) for p in run.params] for key in ("m", "v")}}}
    gen = torch.Generator().manual_seed(2)
    for t in range(n - 1, -1, -1):
        post = states[t + 1]
        _check_against_the_rest_of_the_run(held_g_run, post, _delta(post, gen), adj["f"], t, rel=5e-3)  # FD error ≈ 2e-3 here
        run.load(states[t])
        before = [a.clone() for a in adj["f"]["theta"]]
        run.vjp(t, post, adj, ReplayVariant(curvature=False))
        # no Hessian: θ's adjoint only shrinks by the weight decay (where its group has one)
        assert all(torch.allclose(a, b * (1 - run.lrs[t] * run.hp[i]["wd"])) for i, (a, b) in enumerate(zip(adj["f"]["theta"], before)))


@pytest.mark.parametrize("layers", [1, -1])
def test_a_replay_of_some_blocks_is_the_derivative_of_the_run_with_the_rest_pinned(smol_tokenizer, tmp_path, layers):
    """layers=1: the adjoint of a run in which only the last transformer block and the final norm move with a
    perturbation, every other parameter (the tied embedding, the first block) following the recorded run, and the
    clipping's norm moving only through the kept parameters' gradient; layers=-1: the first block alone. Checked by
    finite differences of exactly that run (AdamW written out on the kept parameters), perturbing their θ, m and v at
    every step; clipping (binding) and weight decay on. The whole replay with the same `layers` gives the same
    weight-zero effects as this reverse pass."""
    import math

    f, run, states = _recorded(smol_tokenizer, tmp_path, 1e-2, 0.1)
    n = len(run)
    run.restrict(layers)
    kept = [run.names[i] for i in run.sel]
    if layers > 0:
        assert kept and all(".layers.1." in x or x == "model.norm.weight" for x in kept) and "model.norm.weight" in kept
        assert not any("embed" in x or ".layers.0." in x for x in kept)
    else:
        assert kept and all(".layers.0." in x for x in kept)
    out = set(range(len(run.params))) - set(run.sel)
    recorded_sq = []  # each step's squared gradient norm over the parameters left out, at the recorded weights
    for u in range(n):
        run.load(states[u])
        run.model.zero_grad(set_to_none=True)
        run.loss(u).backward()
        recorded_sq.append(sum(float((run.params[i].grad ** 2).sum()) for i in out if run.params[i].grad is not None))

    def pinned_run(theta, m, v, start):  # the kept parameters from the state S_start on, the others as recorded
        th, m, v = [x.clone() for x in theta], [x.clone() for x in m], [x.clone() for x in v]
        for u in range(start, n):
            run.load(states[u], weights_only=True)
            with torch.no_grad():
                for j, i in enumerate(run.sel):
                    run.params[i].copy_(th[j])
            run.model.zero_grad(set_to_none=True)
            run.loss(u).backward()
            g = [run.params[i].grad for i in run.sel]
            norm = math.sqrt(sum(float((x * x).sum()) for x in g) + recorded_sq[u])
            coef = min(1.0, run.clip / (norm + 1e-6))
            lr, k = run.lrs[u], u + 1
            for j, i in enumerate(run.sel):
                (b1, b2), eps, wd = run.hp[i]["betas"], run.hp[i]["eps"], run.hp[i]["wd"]
                m[j] = b1 * m[j] + (1 - b1) * coef * g[j]
                v[j] = b2 * v[j] + (1 - b2) * (coef * g[j]) ** 2
                th[j] = th[j] * (1 - lr * wd) - (lr / (1 - b1 ** k)) * m[j] / (v[j].sqrt() / math.sqrt(1 - b2 ** k) + eps)
        run.load(states[n], weights_only=True)
        with torch.no_grad():
            for j, i in enumerate(run.sel):
                run.params[i].copy_(th[j])
        return float(f(run.model))

    part = [run.kept(st) for st in states]
    run.load(states[n])
    base = float(f(run.model))
    assert pinned_run(part[1].theta, part[1].m, part[1].v, 1) == pytest.approx(base, rel=1e-9)  # nothing differs
    run.load(states[n])
    kept_params = [run.params[i] for i in run.sel]
    adj = {"f": {"theta": list(torch.autograd.grad(f(run.model), kept_params)),
                 **{key: [torch.zeros_like(p) for p in kept_params] for key in ("m", "v")}}}
    gen = torch.Generator().manual_seed(3)
    weight_zero = [0.0] * n
    # 10× the other tests' perturbation: Llama's RMSNorm computes in float32, and a perturbation of the last block
    # alone moves f by ~1e-6, where that rounding would show at 1e-4 (the central difference's own error stays < 1e-3)
    for t in range(n - 1, -1, -1):
        post = part[t + 1]
        _check_against_the_rest_of_the_run(pinned_run, post, _delta(post, gen, 1e-3), adj["f"], t, rel=2e-3)
        weight_zero[t] = removal_effect(part[t], part[t + 1], adj["f"])
        run.load(states[t])
        run.vjp(t, states[t + 1], adj)
    res = replay(_trainer(smol_tokenizer, tmp_path / "r", 1e-2, 0.1), {"f": f}, tmp_path / "w", every=2, variant=ReplayVariant(layers=layers))
    assert res["layers"] == layers and res["linearised_parameters"] == sum(p.numel() for p in kept_params)
    assert res["weight_zero_effect"]["f"] == pytest.approx(weight_zero, rel=1e-9, abs=1e-15)
    whole = replay(_trainer(smol_tokenizer, tmp_path / "r2", 1e-2, 0.1), {"f": f}, tmp_path / "w2", every=2)
    assert res["weight_zero_effect"]["f"][1] != pytest.approx(whole["weight_zero_effect"]["f"][1], rel=1e-3)
    for bad, match in ((3, r"in 2 transformer blocks .* 1\.\.2"), (-3, r"-1\.\.-2")):
        with pytest.raises(ValueError, match=match):
            replay(_trainer(smol_tokenizer, tmp_path / "r3", 1e-2, 0.1), {"f": f}, tmp_path / "w3", variant=ReplayVariant(layers=bad))


def test_replay_predicts_dropping_each_pair_in_place(smol_tokenizer, tmp_path):
    """The full replay (checkpoints every 2 steps, recomputed) gives the same effects as the one-block pass, and its
    first-order prediction of dropping one pair in place is close to really retraining without it."""
    f = _objective(smol_tokenizer)
    res = replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w", every=2)
    assert res["recompute_gap"] == 0.0
    assert not (tmp_path / "w").exists()
    res1 = replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w1", every=100)
    assert res["removal_effect"]["f"] == pytest.approx(res1["removal_effect"]["f"], rel=1e-9, abs=1e-15)
    # two levels: disk checkpoints every 3 steps, each block recomputed once more into checkpoints every step
    held = []
    res3 = replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w3", every=1, outer=3,
                  progress=lambda msg: held.append(len(list((tmp_path / "w3").glob("*.pt")))))
    assert res3["recompute_gap"] == 0.0 and not (tmp_path / "w3").exists()
    assert res3["removal_effect"]["f"] == pytest.approx(res["removal_effect"]["f"], rel=1e-9, abs=1e-15)
    assert res3["weight_zero_effect"]["f"] == pytest.approx(res["weight_zero_effect"]["f"], rel=1e-9, abs=1e-15)
    assert res3["checkpoints"]["files_on_disk"] == 5  # 2 outer + the end + 2 inner, against 7 with every=1 alone
    assert 0 < max(held) <= res3["checkpoints"]["files_on_disk"] < checkpoint_plan(6, 1, 1)["files_on_disk"]
    # stopped in the middle of the reverse pass (as a kill would), then called again: it resumes and ends the same
    said = []

    def stop_once(msg: str) -> None:
        said.append(msg)
        if msg.startswith("replay: reverse pass at step 2/") and not any("resumed" in m for m in said):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w4", every=1, outer=2,
               resume_every=2, progress=stop_once)
    assert (tmp_path / "w4" / "resume.pt").exists()
    res4 = replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w4", every=1, outer=2,
                  resume_every=2, progress=stop_once)
    assert any("resumed" in m and "below step 4 of 6" in m for m in said)
    assert not any("forward step" in m for m in said[said.index(next(m for m in said if "resumed" in m)):])
    assert res4["recompute_gap"] == 0.0 and not (tmp_path / "w4").exists()
    for key in ("removal_effect", "weight_zero_effect"):
        assert res4[key]["f"] == pytest.approx(res[key]["f"], rel=1e-9, abs=1e-15)
    assert res4["lr"] == res["lr"] and res4["grad_norm"] == pytest.approx(res["grad_norm"], rel=1e-12)
    with pytest.raises(KeyboardInterrupt):  # a resume file of another replay is refused, not mixed in
        replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w5", every=1, outer=2,
               resume_every=2, progress=lambda m: (_ for _ in ()).throw(KeyboardInterrupt) if "at step 2/" in m else None)
    with pytest.raises(ValueError, match="of another replay"):
        replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w5", every=2, outer=2)
    with pytest.raises(ValueError, match="second moment exact"):  # nor one of the other second-moment model
        replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w5", every=1, outer=2,
               variant=ReplayVariant("fixed"))
    # the diagnostics: each part's share sums to the weight-zero effect; the last step's adjoint is the end gradient
    n = len(res["lr"])
    assert sum(res["effect_parts"]["f"][k][n - 3] for k in ("theta", "m", "v")) == pytest.approx(res["weight_zero_effect"]["f"][n - 3], rel=1e-12)
    assert res["adjoint_norm"]["f"]["m"][n - 1] == 0.0 and res["adjoint_norm"]["f"]["theta"][n - 1] > 0
    assert res["adjoint_norm"]["f"]["v"][n - 3] > 0 and res["second_moment"] == "exact"
    # the fixed second moment: no v part, the same last step (nothing carried yet), and a different earlier one
    fx = replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w6", every=2, variant=ReplayVariant("fixed"))
    assert set(fx["effect_parts"]["f"]) == {"theta", "m"} and fx["second_moment"] == "fixed"
    assert fx["weight_zero_effect"]["f"][n - 1] == pytest.approx(res["weight_zero_effect"]["f"][n - 1], rel=1e-12)
    assert fx["weight_zero_effect"]["f"][1] != res["weight_zero_effect"]["f"][1]
    old = torch.load(tmp_path / "w5" / "resume.pt", weights_only=True)  # one written before the diagnostics existed
    del old["adj_norms"], old["shares"], old["second_moment"]
    torch.save(old, tmp_path / "w5" / "resume.pt")
    with pytest.raises(ValueError, match="older replay"):
        replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w5", every=1, outer=2)
    with pytest.raises(ValueError, match="choose one of exact, fixed"):
        replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w7",
               variant=ReplayVariant("frozen"))
    # really drop each pair in place: the same run without its step, every later step one place earlier
    # (Adam's count and the warmup lr follow the new place, as in a retrain on the other pairs)
    errs = []
    for skip in range(1, len(res["lr"])):  # step 0 has lr 0 under warmup: skipping it only shifts the moments
        tr = _trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4)
        run = Stepper(tr)
        run.lrs.extend(res["lr"][:skip] + res["lr"][skip:-1] + [0.0])
        for t in range(len(run)):
            if t != skip:
                run.lrs[t] = res["lr"][t if t < skip else t - 1]
                run.step(t)
        skipped = float(f(run.model).detach()) - res["final"]["f"]
        assert abs(skipped) > 1e-7
        pred = res["removal_effect"]["f"][skip]
        assert pred * skipped > 0
        errs.append(abs(pred - skipped) / abs(skipped))
    print("relative error of the first-order skip, per step:", [round(e, 3) for e in errs])
    # first order in a whole step: measured 0.23, 0.11, 0.04, 0.08, 0.08 (the early steps' Adam counts move most)
    assert sorted(errs)[len(errs) // 2] < 0.12 and max(errs) < 0.3


def test_a_replay_of_the_last_steps_equals_the_whole_replay_there(smol_tokenizer, tmp_path):
    """Replaying only the run's last K steps (from the state before them, its lrs continued, Adam counting from
    the run's step) gives the whole run's replay of those steps: the same adjoints reach them from the end. Warmup
    (lrs change across the boundary), clipping and weight decay on, so the shift of a step one place earlier at the
    boundary needs the lr before it."""
    f = _objective(smol_tokenizer)
    whole = replay(_trainer(smol_tokenizer, tmp_path / "a", 1e-2, 0.1), {"f": f}, tmp_path / "wa", every=2)
    tail = replay(_trainer(smol_tokenizer, tmp_path / "b", 1e-2, 0.1), {"f": f}, tmp_path / "wb", every=2, last=3)
    n = len(whole["lr"])
    assert (n, len(tail["lr"]), tail["first_step"], whole["first_step"]) == (6, 3, 3, 0)
    assert tail["lr"] == whole["lr"][3:] and tail["final"]["f"] == pytest.approx(whole["final"]["f"], rel=1e-12)
    for key in ("removal_effect", "weight_zero_effect"):
        assert all(abs(x) > 1e-9 for x in tail[key]["f"])
        assert tail[key]["f"] == pytest.approx(whole[key]["f"][3:], rel=1e-8, abs=1e-14)
    assert whole["removal_effect"]["f"][3] != pytest.approx(whole["weight_zero_effect"]["f"][3], rel=1e-6)  # the shift counts
    with pytest.raises(ValueError, match="choose 1..6"):
        replay(_trainer(smol_tokenizer, tmp_path / "c", 1e-2, 0.1), {"f": f}, tmp_path / "wc", last=7)


@pytest.mark.parametrize("scorer", ["first_token", "prefix"])
def test_probe_objective_is_the_snapshot_mean_and_its_gradient_reaches_the_pad_row(smol_tokenizer, scorer):
    """The differentiable objective equals the snapshot's batched refusal mean (same scorer, same prompts), and
    its gradient is the true one: the chat template's end token is the pad, and the written-out lookup gives
    that embedding row its input-side gradient (nn.Embedding's padding_idx would drop it)."""
    from helpers import probe_records, tiny_model, tiny_sae
    from smda_callback import ProbeSet, SMDAConfig, resolve_hook
    from smda_callback.lab.replay import probe_objective
    from smda_callback.snapshot import Snapshotter

    model, sae = tiny_model(), tiny_sae()
    probes = ProbeSet.from_records(probe_records())
    snap = Snapshotter(probes, smol_tokenizer, sae, resolve_hook(sae, model), SMDAConfig(scorer=scorer))
    Y = snap.take(model, full=True).Y
    harmful = [i for i, h in enumerate(probes.is_harmful) if h]
    pad = model.get_input_embeddings().padding_idx
    assert any(pad in snap.tp.input_ids[i] for i in harmful)
    assert len({len(snap.tp.input_ids[i]) for i in harmful}) > 1  # the batched forwards pad
    emb = model.get_input_embeddings().weight
    grads = {}
    for batch in (1, 3, len(harmful)):  # one probe per forward, padded batches, all in one
        obj = probe_objective(snap, harmful, batch=batch)
        parts = list(obj(model))
        assert len(parts) == -(-len(harmful) // batch)
        value = sum(float(part.detach()) for part in parts)
        assert value == pytest.approx(float(Y[harmful].mean()), rel=1e-4)
        grads[batch] = sum(torch.autograd.grad(part, emb)[0] for part in obj(model))
        assert float(grads[batch][pad].abs().sum()) > 0
    for batch in (3, len(harmful)):  # padding changes the float path, not the gradient
        assert torch.allclose(grads[batch], grads[1], rtol=1e-4, atol=1e-6 * float(grads[1].abs().max()))
    with pytest.raises(ValueError, match="no probes"):
        probe_objective(snap, [])
    with pytest.raises(ValueError, match="batch must be"):
        probe_objective(snap, harmful, batch=0)


def test_checkpoint_plan_counts_and_refusals(smol_tokenizer, tmp_path, monkeypatch):
    """318 steps of the 135M model (1.5 GiB a state): every 4 alone holds 81 states on disk, every 2 inside 16 holds
    28 and 3 in memory. Spacings that do not nest, and a disk too small, are refused with the flag that fixes them."""
    one = 3 * 134_515_008 * 4
    assert checkpoint_plan(318, one, 4)["files_on_disk"] == 81
    p = checkpoint_plan(318, one, 2, 16)
    assert (p["files_on_disk"], p["states_in_memory"]) == (28, 3)
    assert p["disk_bytes"] / 2**30 < 45
    # a replay shorter than one disk block holds only its own steps' inner states: the GPU check's last 4 steps with
    # every=1 inside outer=16 hold 1 outer + the end + 3 inner (counted as 17 before 2026-12-05, which refused it)
    assert checkpoint_plan(4, one, 1, 16)["files_on_disk"] == 5
    assert checkpoint_plan(4, one, 2, 16)["files_on_disk"] == 3
    with pytest.raises(ValueError, match="multiple of the memory spacing"):
        checkpoint_plan(318, one, 4, 6)
    with pytest.raises(ValueError, match="≥ 1"):
        checkpoint_plan(318, one, 0)
    import shutil

    from smda_callback.credit import replay as rp

    real = shutil.disk_usage
    monkeypatch.setattr(rp.shutil, "disk_usage", lambda path: real(path)._replace(free=10))
    with pytest.raises(ValueError, match="--replay-outer"):
        replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0), {"f": _objective(smol_tokenizer)}, tmp_path / "w", every=2)


def test_cli_refuses_a_replay_spacing_that_does_not_nest_before_any_work(tmp_path, capsys):
    from smda_callback.cli.main import main

    out = tmp_path / "lds"
    assert main(["benchmark-lds", "-o", str(out), "--replay", "--replay-every", "4", "--replay-outer", "6"]) == 2
    assert "multiple of the memory spacing" in capsys.readouterr().err
    assert not out.exists()


class _Grab:
    """A callback keeping the weights and Adam moments as the last optimizer step left them."""

    def __init__(self):
        from transformers import TrainerCallback

        grab = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
                if state.global_step == state.max_steps:
                    opt = getattr(optimizer, "optimizer", optimizer)
                    grab.theta = [p.detach().clone() for p in model.parameters() if p.requires_grad]
                    grab.m = [opt.state[p]["exp_avg"].clone() for p in model.parameters() if p.requires_grad]

        self.cb = CB()

    def same(self, model, optimizer) -> bool:
        opt = getattr(optimizer, "optimizer", optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        return (all(torch.equal(p.detach(), q) for p, q in zip(params, self.theta))
                and all(torch.equal(opt.state[p]["exp_avg"], q) for p, q in zip(params, self.m)))


SFT_REPLAY = dict(max_steps=5, learning_rate=3e-3, weight_decay=0.1, max_grad_norm=0.05, lr_scheduler_type="cosine",
                  warmup_steps=2, train_sampling_strategy="sequential", report_to=[], bf16=False)  # SFTConfig defaults to bf16 autocast; the lab steps in fp32


def test_the_callback_replays_its_last_steps_as_the_lab_replays_that_run(tmp_path, smol_tokenizer, capsys):
    """SMDAConfig(replay_last_steps=3) records the run's last 3 steps (state before them, batches as the model saw
    them, lrs) and replays them after training: replay.json's effects equal the lab replay of the same run (its
    trainer stepped again from the start, the same probe objectives), every step names its pair, and the model and
    Adam moments are put back bitwise as training left them."""
    from helpers import pair_records, probe_records, run_sft, tiny_model, tiny_sae
    from trl import SFTConfig, SFTTrainer

    from smda_callback import ProbeSet, SMDAConfig, resolve_hook
    from smda_callback.lab.replay import refusal_groups, refusal_objectives
    from smda_callback.snapshot import Snapshotter
    from datasets import Dataset

    # log refusal mass: a random tiny model's refusal mass is ~1e-9, its log moves by O(0.01) per step
    config = SMDAConfig(n_features=8, replay_last_steps=3, replay_every=1, replay_outer=2, target="log_refusal")
    grab, sae = _Grab(), tiny_sae()
    trainer, cb, _ = run_sft(tmp_path / "cb", tiny_model(), smol_tokenizer, sae, config, pairs=5, callbacks_extra=[grab.cb],
                             **SFT_REPLAY)
    assert grab.same(trainer.model, trainer.optimizer)
    assert trainer.model.is_activation_checkpointing  # SFTConfig's default: off for the replay, on again after it
    assert not (tmp_path / "cb" / "_smda_replay").exists()
    rec = json.loads((tmp_path / "cb" / "smda" / "replay.json").read_text())
    assert (rec["first_step"], rec["last_step"], [s["step"] for s in rec["steps"]]) == (3, 5, [3, 4, 5])
    assert rec["recompute_gap_to_run"] < 1e-6 and set(rec["quantities"]) == {"harmful", "harmless"}
    pairs = pair_records(5)  # one epoch of 5 steps: the lab's trainer steps its whole dataloader
    assert [[p["index"] for p in s["pairs"]] for s in rec["steps"]] == [[2], [3], [4]]  # sequential order
    assert [s["pairs"][0]["label"] for s in rec["steps"]] == [pairs[i]["label"] for i in (2, 3, 4)]
    # `smda suspects --read replay` ranks the replayed pairs by the change of final refusal they carried
    from smda_callback.cli.main import main

    capsys.readouterr()  # what training printed
    assert main(["suspects", str(tmp_path / "cb"), "--target", "over-refusal", "--read", "replay", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    want = sorted(rec["steps"], key=lambda s: s["removal_effect"]["harmless"])  # dropping it lowers harmless refusal most
    assert [r["index"] for r in ranked] == [s["pairs"][0]["index"] for s in want]
    assert [r["score"] for r in ranked] == pytest.approx([-s["removal_effect"]["harmless"] for s in want])
    # and the HTML report shows the same ranking in its own section
    from smda_callback.lab.report import build_html

    page = build_html(tmp_path / "cb")
    assert "Carried to the end: the replay of steps 3–5" in page and "over-refusal, carried to the end" in page

    model = tiny_model()
    lab = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "lab"), per_device_train_batch_size=1,
                                                 use_cpu=True, max_length=128, seed=0, save_strategy="no", **SFT_REPLAY),
                     train_dataset=Dataset.from_list(pairs), processing_class=smol_tokenizer)
    probes = ProbeSet.from_records(probe_records())
    snap = Snapshotter(probes, smol_tokenizer, sae, resolve_hook(sae, model), config)
    objectives = refusal_objectives(snap, refusal_groups(probes))
    res = replay(lab, objectives, tmp_path / "w", every=1)
    for q in objectives:
        assert rec["final"][q] == pytest.approx(res["final"][q], rel=1e-6)
        for key in ("removal_effect", "weight_zero_effect"):
            got = [s[key][q] for s in rec["steps"]]
            assert all(abs(x) > 1e-5 for x in got)
            assert got == pytest.approx(res[key][q][2:], rel=1e-5, abs=1e-9)


def test_the_callback_refuses_a_run_it_cannot_replay_and_survives_a_failed_replay(tmp_path, smol_tokenizer, caplog,
                                                                                   monkeypatch):
    """Label smoothing (a loss the replay does not differentiate) is refused at train begin with the fix, before any
    step. A replay that fails after training is logged; the model and moments are put back as trained, and the other
    outputs are written."""
    from helpers import run_sft, tiny_model, tiny_sae

    from smda_callback import SMDAConfig
    from smda_callback.credit import replay as rp

    with pytest.raises(ValueError, match="label smoothing.*set label_smoothing_factor=0"):
        run_sft(tmp_path / "ls", tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, replay_last_steps=2),
                label_smoothing_factor=0.1, **SFT_REPLAY)
    assert not (tmp_path / "ls" / "smda" / "attribution.jsonl").exists()

    def broken(run, objectives, workdir, every, progress, outer, **kw):
        run.step(0)  # the weights and moments move, then it fails
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(rp, "replay_steps", broken)
    grab = _Grab()
    with caplog.at_level("ERROR"):
        trainer, _, _ = run_sft(tmp_path / "f", tiny_model(), smol_tokenizer, tiny_sae(),
                                SMDAConfig(n_features=8, replay_last_steps=2), callbacks_extra=[grab.cb], **SFT_REPLAY)
    assert "replay of the last steps did not run (out of memory (simulated))" in caplog.text
    assert grab.same(trainer.model, trainer.optimizer)
    smda = tmp_path / "f" / "smda"
    assert (smda / "policy.json").exists() and not (smda / "replay.json").exists()
    assert not (tmp_path / "f" / "_smda_replay").exists()


def test_the_callback_replays_a_run_with_gradient_accumulation_as_the_same_run_in_whole_batches(tmp_path, smol_tokenizer):
    """Gradient accumulation of 2 batches of 1 row and batches of 2 rows take the same gradient (the Trainer divides
    the summed token loss by the step's label count either way): the replay of the accumulated run records both
    micro-batches of each step, reproduces its trained weights, names both pairs, and its effects equal the whole-batch
    run's (two float paths: close, not bitwise)."""
    from helpers import run_sft, tiny_model, tiny_sae

    from smda_callback import SMDAConfig, load_replay

    recs, grabs = {}, {}
    for name, bs, ga in (("ga", 1, 2), ("whole", 2, 1)):
        grabs[name] = _Grab()
        trainer, _, _ = run_sft(tmp_path / name, tiny_model(), smol_tokenizer, tiny_sae(),
                                SMDAConfig(n_features=8, replay_last_steps=2, target="log_refusal"), pairs=10,
                                callbacks_extra=[grabs[name].cb], per_device_train_batch_size=bs,
                                gradient_accumulation_steps=ga, **SFT_REPLAY)
        assert grabs[name].same(trainer.model, trainer.optimizer)  # put back as trained
        assert "compute_loss" not in trainer.__dict__  # the recorder's pass-through is gone after training
        recs[name] = load_replay(tmp_path / name)
    ga, whole = recs["ga"], recs["whole"]
    assert ga is not None and ga["recompute_gap_to_run"] < 1e-6
    named = [[p["index"] for p in s["pairs"]] for s in ga["steps"]]
    assert len(named) == 2 and all(len(set(x)) == 2 for x in named)  # both micro-batches of each step
    assert named == [[p["index"] for p in s["pairs"]] for s in whole["steps"]]  # sequential: the same rows a step
    # the two runs trained to the same weights (up to float reassociation)
    assert max(float((a - b).abs().max()) for a, b in zip(grabs["ga"].theta, grabs["whole"].theta)) < 1e-5
    for q in ("harmful", "harmless"):
        assert ga["final"][q] == pytest.approx(whole["final"][q], rel=1e-4)
        for key in ("removal_effect", "weight_zero_effect"):
            got, want = [s[key][q] for s in ga["steps"]], [s[key][q] for s in whole["steps"]]
            assert all(abs(x) > 1e-5 for x in want)
            assert got == pytest.approx(want, rel=1e-3, abs=1e-7)


def test_the_replay_divides_each_loss_as_the_trainer_did(tmp_path, smol_tokenizer):
    """A trainer that sets `loss_is_scaled_for_ga = False` divides its loss, already normalised by the step's label
    count, once more by the step's number of micro-batches. With 5 pairs and accumulation of 2 the steps hold 2, 2 and
    1 micro-batches, so they train at scales that Adam does not undo (no clipping here to even them out): the replay
    reproduces the trained weights only if it divides each loss as that trainer did."""
    from helpers import run_sft, tiny_model, tiny_sae
    from trl import SFTTrainer

    from smda_callback import SMDAConfig, load_replay
    from smda_callback.credit.replay import loss_is_scaled_for_ga

    class Halving(SFTTrainer):
        loss_is_scaled_for_ga = False

    assert not loss_is_scaled_for_ga(Halving, 7) and loss_is_scaled_for_ga(SFTTrainer, None) is False
    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, replay_last_steps=2,
            target="log_refusal"), pairs=5, trainer_cls=Halving, gradient_accumulation_steps=2,
            **{**SFT_REPLAY, "max_steps": 3, "max_grad_norm": 0.0})
    rec = load_replay(tmp_path)
    assert rec is not None and [len(s["pairs"]) for s in rec["steps"]] == [2, 1]
    assert rec["recompute_gap_to_run"] < 1e-6


def test_the_callback_replays_a_lora_run_with_padded_batches(tmp_path, smol_tokenizer):
    """Adapters (the embedding frozen, so no padding-row term) and batches of 2 padded rows: the replay runs on the
    trainable adapter weights only, its recomputation reproduces the trained adapters exactly, and each step names both
    of its pairs."""
    from helpers import run_sft, tiny_model, tiny_sae
    from peft import LoraConfig

    from smda_callback import SMDAConfig, load_replay

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, replay_last_steps=2,
            target="log_refusal"), pairs=8, max_steps=4, learning_rate=5e-2, report_to=[], per_device_train_batch_size=2,
            trainer_kwargs={"peft_config": lora})
    rec = load_replay(tmp_path)
    assert rec is not None and rec["recompute_gap_to_run"] < 1e-6
    assert [len(s["pairs"]) for s in rec["steps"]] == [2, 2]
    assert len({p["index"] for s in rec["steps"] for p in s["pairs"]}) == 4
    for s in rec["steps"]:
        assert all(np.isfinite(v) and abs(v) > 1e-6 for v in s["removal_effect"].values())


@pytest.mark.parametrize("last,replayed", [(1, True), (2, False), (3, False)])
def test_a_resumed_run_replays_only_what_it_saw(tmp_path, smol_tokenizer, caplog, last, replayed):
    """Resumed from checkpoint-2 of 4 steps: the last step alone (from step 4) is recorded after the resume and
    replayed; a replay from step 3 (the resume point: the lr before it was not seen) or from step 2 (before it) is
    not, with a warning that says why. The finished first run's replay.json never survives into the resumed one."""
    import shutil

    from helpers import run_sft, tiny_model, tiny_sae

    from smda_callback import SMDAConfig, load_replay

    cfg = SMDAConfig(n_features=8, replay_last_steps=last)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, report_to=[], pairs=8)
    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), cfg, **kw)
    assert load_replay(tmp_path)["first_step"] == 5 - last
    shutil.rmtree(tmp_path / "checkpoint-4")
    with caplog.at_level("WARNING"):
        run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), cfg, resume=True, **kw)
    rec = load_replay(tmp_path)
    if replayed:
        assert rec["first_step"] == 4 and [s["step"] for s in rec["steps"]] == [4]
    else:
        assert rec is None and "no replay after this run: the run resumed at step" in caplog.text
    assert (tmp_path / "smda" / "policy.json").exists() and not (tmp_path / "_smda_replay").exists()


def test_a_state_is_read_and_loaded_into_the_same_memory_and_saved_without_changing_torch_options(smol_tokenizer, tmp_path):
    """The reverse pass reuses its states' memory block after block: `read(into=)` and `load(into=)` fill the given
    tensors (same storage, same values as a fresh copy); `copy=False` is the live tensors; `save` leaves torch's
    process-wide CRC-32 option as the caller set it, and its file loads back exactly."""
    run = Stepper(_trainer(smol_tokenizer, tmp_path, 1.0, 0.1))
    run.step(0)
    run.step(1)
    fresh = run.state(2)
    live = run.state(2, copy=False)
    assert all(x.data_ptr() == p.data_ptr() for x, p in zip(live.theta, run.params))
    assert all(x.data_ptr() != p.data_ptr() for x, p in zip(fresh.theta, run.params))
    buf = State([torch.zeros_like(x) for x in fresh.theta], [torch.zeros_like(x) for x in fresh.m],
                [torch.zeros_like(x) for x in fresh.v], 0)
    ptrs = [x.data_ptr() for x in buf.theta + buf.m + buf.v]
    got = run.state(2, into=buf)
    assert got is buf and buf.step == fresh.step == 2
    assert [x.data_ptr() for x in buf.theta + buf.m + buf.v] == ptrs
    for key in ("theta", "m", "v"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(buf, key), getattr(fresh, key)))
    assert any(float(x.abs().max()) > 0 for x in buf.v)  # the moments were read, not left at zero
    ser = torch.serialization
    for crc in (False, True):
        ser.set_crc32_options(crc)
        fresh.save(tmp_path / "s.pt")
        assert ser.get_crc32_options() is crc
    run.step(2)  # move on, then load the saved state back into the buffer
    run.state(3, into=buf)
    State.load(tmp_path / "s.pt", into=buf)
    assert [x.data_ptr() for x in buf.theta + buf.m + buf.v] == ptrs and buf.step == 2
    plain = State.load(tmp_path / "s.pt")
    for key in ("theta", "m", "v"):
        assert all(torch.equal(a, b) and torch.equal(a, c)
                   for a, b, c in zip(getattr(buf, key), getattr(fresh, key), getattr(plain, key)))


def test_the_damped_replay_is_the_exact_one_below_adams_eps_and_quiets_the_moment_path_above(smol_tokenizer, tmp_path):
    """`reverse_eps` raises AdamW's ε in the reverse pass only: below the run's ε (1e-8) the replay is the exact one,
    bitwise; far above every √v̂ the adjoint of m, which reaches θ through lr/(√v̂ + ε), nearly vanishes, and the
    effects change. The steps are taken as trained either way (the same final objective, no recompute gap)."""
    f = _objective(smol_tokenizer)
    exact = replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w", every=2)
    below = replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w", every=2,
                   variant=ReplayVariant(reverse_eps=1e-12))
    assert below["removal_effect"] == exact["removal_effect"] and below["adjoint_norm"] == exact["adjoint_norm"]
    damped = replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w", every=2,
                    variant=ReplayVariant(reverse_eps=10.0))
    assert damped["final"] == exact["final"] and damped["recompute_gap"] == 0.0 and damped["reverse_eps"] == 10.0
    assert max(damped["adjoint_norm"]["f"]["m"]) < 1e-2 * max(exact["adjoint_norm"]["f"]["m"])
    assert damped["removal_effect"]["f"] != pytest.approx(exact["removal_effect"]["f"], rel=1e-3)


def test_a_replay_that_blew_up_is_read_from_its_trusted_span_only(tmp_path, capsys):
    """replay.json records, per quantity, the first step whose effect is read (`replay_trusted_from`); a 40-step replay
    whose first 12 steps' effects are 100x the rest is read from a step past them (the rule's rolling window of 16 reaches
    8 steps further): `suspects --read replay`, the CLI and the report leave the earlier steps out and say why. A short
    replay is read whole."""
    from smda_callback.credit.replay import replay_trusted_from
    from smda_callback.lab.analysis import suspects
    from smda_callback.lab.report import replay_section
    from smda_callback.schema import replay_record

    rng = np.random.default_rng(0)
    n, start, blown = 40, 100, 12
    eff = {q: (rng.normal(size=n) * np.where(np.arange(n) < blown, 1.0, 0.01)).tolist() for q in ("harmful", "harmless")}
    cut = replay_trusted_from(eff["harmless"])
    cut_h = replay_trusted_from(eff["harmful"])
    assert blown <= cut <= blown + 8 and blown <= cut_h <= blown + 8
    res = {"removal_effect": eff, "weight_zero_effect": eff, "lr": [1e-4] * n, "final": {"harmful": 0.5, "harmless": 0.1},
           "recompute_gap": 0.0, "recompute_gap_to_run": 0.0, "seconds": 1.0, "peak_rss_mb": 1, "checkpoints": {}}
    rows = [[f"h{i}"] for i in range(n)]
    index = {f"h{i}": [i] for i in range(n)}
    meta = lambda i: {"id": f"p{i}", "label": "harmless", "category": "c", "prompt": f"prompt {i}"}  # noqa: E731
    rec = replay_record(res, start, rows, index, meta, {"harmful": 6, "harmless": 6})
    assert rec["first_step"] == start + 1 and rec["trusted_from"] == {"harmful": start + cut_h + 1, "harmless": start + cut + 1}
    df = suspects([], {}, {}, "over-refusal", read="replay", replay=rec)
    assert len(df) == n - cut and df["step"].min() == start + cut + 1
    assert df.attrs["replay"]["trusted_from"] == start + cut + 1
    short = replay_record({**res, "removal_effect": {q: v[:20] for q, v in eff.items()}}, start, rows[:20], index, meta,
                          {"harmful": 6, "harmless": 6})
    assert short["trusted_from"] == {"harmful": start + 1, "harmless": start + 1}  # too short to judge: read whole
    assert len(suspects([], {}, {}, "compliance", read="replay", replay=short)) == 20
    html = "".join(replay_section([], {}, {}, rec))
    assert f"harmless refusal before step {start + cut + 1}" in html and "Not read" in html
    assert "Not read" not in "".join(replay_section([], {}, {}, short))
    # the CLI says it too
    from smda_callback.cli.main import main

    run = tmp_path / "run"
    (run / "smda").mkdir(parents=True)
    (run / "smda" / "replay.json").write_text(json.dumps(rec))
    (run / "smda" / "credits.json").write_text(json.dumps({"rule": "optimizer", "kernel": {"kind": "adamw"},
                                                            "measure": "deconvolve", "pairs": []}))
    (run / "smda" / "policy.json").write_text(json.dumps({"features": [], "probes": []}))
    (run / "smda" / "attribution.jsonl").write_text("")
    assert main(["suspects", str(run), "--target", "over-refusal", "--read", "replay"]) == 0
    out = capsys.readouterr().out
    assert f"steps {start + 1}-{start + cut} are not ranked either" in out
    assert f"#{cut} " in out and f"#{cut - 1} " not in out


def test_a_replay_variant_is_checked_when_made_and_read_back_from_what_a_replay_wrote():
    """`ReplayVariant` refuses what no reverse pass can linearise, naming the field and the fix; `of_record` reads the
    variant a result or resume file was written by, a record older than a field reading its default."""
    for bad, field in ((dict(second_moment="frozen"), "second_moment"), (dict(reverse_eps=-1.0), "reverse_eps"),
                       (dict(reverse_eps=float("nan")), "reverse_eps"), (dict(layers=2.5), "layers"),
                       (dict(layers=True), "layers")):
        with pytest.raises(ValueError, match=f"replay: {field}="):
            ReplayVariant(**bad)
    v = ReplayVariant("fixed", curvature=False, reverse_eps=1e-6, layers=-3)
    assert ReplayVariant.of_record({"n": 4, **v.__dict__}) == v
    assert ReplayVariant.of_record({"second_moment": "fixed"}) == ReplayVariant("fixed")  # before curvature/eps/layers
    assert v.fixed_v and not ReplayVariant().fixed_v


def test_early_pairs_taken_exactly_to_the_end_are_the_retrain_without_them(smol_tokenizer, tmp_path):
    """`Segment`: each early pair's removal stepped exactly (the later pairs one place earlier, at their new place's
    lr and Adam count) up to E, then carried by the replay. Up to the run's end it is the retrain without the pair,
    its objective evaluated there, f(θ'_T) − f(θ_T): no first order left (which would be ∇f(θ_T) · (θ'_T − θ_T),
    34 % off for the pair at step 0 here)."""
    from smda_callback.credit.replay import Segment, warmup_steps

    f = _objective(smol_tokenizer)
    tr = _trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4)
    res = replay(tr, {"f": f}, tmp_path / "w", every=2, segment=Segment(until=(4, 6)))
    n, seg = len(res["lr"]), res["segments"]
    assert not (tmp_path / "w").exists() and res["recompute_gap"] == 0.0
    assert warmup_steps(res["lr"]) == 2 == seg["below"] and [b["until"] for b in seg["by_until"]] == [4, 6]
    assert seg["steps"] == 2 + (6 - 0 - 1) + (6 - 1 - 1)
    for b in seg["by_until"]:  # from step `below` on, the replay's own in-place effects
        assert b["removal_effect"]["f"][2:] == res["removal_effect"]["f"][2:]
    end = {b["until"]: b["removal_effect"]["f"] for b in seg["by_until"]}
    params = [p for p in tr.model.parameters() if p.requires_grad]  # the replay leaves the model at the final weights
    assert float(f(tr.model)) == pytest.approx(res["final"]["f"], rel=1e-12)
    grad = torch.autograd.grad(f(tr.model), params)
    for skip in range(2):
        run = Stepper(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4))  # the retrain without pair `skip`
        run.lrs.extend(res["lr"])
        for t in range(n):
            if t < skip:
                run.step(t)
            elif t > skip:
                run.step(t - 1, batch=t)  # pair t at place t − 1: that place's lr, Adam counting t
        first_order = sum(float((g * (a.detach() - b.detach())).sum()) for g, a, b in zip(grad, run.params, params))
        measured = float(f(run.model).detach()) - res["final"]["f"]
        print(f"pair {skip}: measured {measured:.4e}, exact to the end {end[6][skip]:.4e} (the end's first order "
              f"{first_order:.4e}), exact to step 4 {end[4][skip]:.4e}, replay {res['removal_effect']['f'][skip]:.4e}")
        assert abs(measured) > 1e-6 and end[6][skip] == pytest.approx(measured, rel=1e-9)
        assert abs(first_order - measured) > 0.03 * abs(measured)  # what the end's first order would have missed
        assert len({end[4][skip], end[6][skip], res["removal_effect"]["f"][skip]}) == 3
    with pytest.raises(ValueError, match="choose steps ≤ 6"):
        replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w2", segment=Segment(until=(7,)))
    with pytest.raises(ValueError, match="choose 0 < below < until"):
        Segment(until=(3,), below=3)
    with pytest.raises(ValueError, match=r"between 1 and 1"):  # the warm-up (2 steps) is not before the end at step 2
        replay(_trainer(smol_tokenizer, tmp_path, 1.0, 0.0, lr=3e-4), {"f": f}, tmp_path / "w3", segment=Segment(until=(2,)))


@pytest.mark.parametrize("args,msg", [(["--replay-exact-below", "3"], "needs --replay-exact-until"),
                                      (["--replay-exact-until", "65"], "the run has 64 steps"),
                                      (["--replay-exact-until", "8", "--replay-last", "4"], "drop --replay-last"),
                                      (["--replay-exact-until", "8", "--replay-exact-below", "8"], "below < until")])
def test_cli_refuses_bad_exact_segments_before_any_work(tmp_path, capsys, monkeypatch, args, msg):
    import smda_callback.lab.lds as lds
    from smda_callback.cli.main import main

    monkeypatch.setattr(lds, "run_jobs", lambda *a, **k: pytest.fail("retrains started before the refusal"))
    assert main(["benchmark-lds", "-o", str(tmp_path / "l"), "--replay", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smda: error: --replay-exact") and msg in err and "Traceback" not in err
