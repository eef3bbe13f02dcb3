"""credit.py: the optimizer's kernel against torch's optimizers, the engine's invariants, and
per-pair credit in real SFTTrainer runs (telescoping, SGD = step, identical rows split in half)."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_ulps_close, pair_records, run_sft, tiny_model, tiny_sae
from smda_callback import SMDAConfig
from smda_callback.credit import CreditEngine, OptimizerKernel, newest_update, shares_from_slopes


def _grads(T, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for _ in range(T)]


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.99), weight_decay=0.0),
    lambda p: torch.optim.Adam([p], lr=0.1, betas=(0.9, 0.999)),
    lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.7, dampening=0.2),
    lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.6, nesterov=True),
    lambda p: torch.optim.SGD([p], lr=0.1),
    lambda p: torch.optim.Adam([p], lr=0.1, fused=True),
    lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.7, foreach=True),
])
def test_kernel_reproduces_torch_updates(make):
    """Δθ_t = −D_t Σ_s c(t, s) g_s with D_t read from the optimizer: the kernel *is* the optimizer."""
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = make(p)
    kernel, warning = OptimizerKernel.from_optimizer(opt)
    assert warning is None and kernel.kind in ("adam", "momentum", "sgd")
    grads = [g.double() for g in _grads(6)]
    for t, g in enumerate(grads, start=1):
        for group in opt.param_groups:  # a schedule: the kernel must use each step's own lr
            group["lr"] = 0.1 / t
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        D = 1.0
        if kernel.kind == "adam":
            st, b2, eps = opt.state[p], opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
            D = 1.0 / ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + eps)
        want = -D * sum(kernel.coef(t, s, 0.1 / t) * grads[s - 1] for s in range(1, t + 1))
        torch.testing.assert_close(p.detach() - before, want, rtol=1e-9, atol=1e-12)
        u = newest_update(opt, kernel, t)[0]  # the newest gradient's part alone
        torch.testing.assert_close(u, -D * kernel.coef(t, t, 0.1 / t) * g, rtol=1e-9, atol=1e-12)


def test_unsupported_optimizer_falls_back_to_step_with_a_reason():
    p = torch.nn.Parameter(torch.zeros(3))
    kernel, warning = OptimizerKernel.from_optimizer(torch.optim.Adagrad([p]))
    assert kernel.kind == "step" and "Adagrad" in warning and "credit='step'" in warning


def _synthetic(kernel, T=40, width=6, batch=1, seed=0):
    """Windows whose changes follow the linear model exactly: Δ_t = Σ_s c(t, s)·γ_s."""
    rng = np.random.default_rng(seed)
    gam = {(t, i): rng.normal(size=width) for t in range(1, T + 1) for i in range(batch)}
    lrs = {t: 1e-3 * (1 + 0.5 * np.sin(t)) for t in range(1, T + 1)}
    deltas = []
    for t in range(1, T + 1):
        deltas.append(sum(kernel.coef(t, s, lrs[t]) * gam[(s, i)] / batch for s in range(1, t + 1) for i in range(batch)))
    truth = {f"p{s}_{i}": sum(kernel.coef(t, s, lrs[t]) for t in range(s, T + 1)) * gam[(s, i)] / batch
             for s in range(1, T + 1) for i in range(batch)}
    return lrs, deltas, truth


@pytest.mark.parametrize("kernel", [OptimizerKernel("adam", 0.9), OptimizerKernel("momentum", 0.8, 0.1, True),
                                    OptimizerKernel("sgd")])
def test_deconvolution_recovers_each_pair_when_the_linear_model_holds(kernel):
    lrs, deltas, truth = _synthetic(kernel)
    eng = CreditEngine(kernel, 6)
    for t, d in enumerate(deltas, start=1):
        eng.lr(t, lrs[t])
        eng.window([t], [(f"p{t}_0", t, 1.0)], d)
    for h, v in truth.items():
        np.testing.assert_allclose(eng.totals[h], v, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(eng.residual_total, 0.0, atol=1e-15)


def test_step_credit_gives_a_step_to_its_pair_and_misses_the_momentum():
    kernel = OptimizerKernel("adam", 0.9)
    lrs, deltas, truth = _synthetic(kernel)
    step = CreditEngine(OptimizerKernel("step"), 6)
    for t, d in enumerate(deltas, start=1):
        step.window([t], [(f"p{t}_0", t, 1.0)], d)
    err = np.mean([np.linalg.norm(step.totals[h] - v) / np.linalg.norm(v) for h, v in truth.items()])
    assert err > 0.5  # the naive rule is far off under momentum; the optimizer kernel is exact above


@pytest.mark.parametrize("measure", ["deconvolve", "ghost"])
def test_credits_plus_residual_telescope_over_windows_and_batches(measure):
    kernel = OptimizerKernel("adam", 0.9)
    rng = np.random.default_rng(1)
    eng = CreditEngine(kernel, 4, measure)
    total = np.zeros(4)
    every = 1 if measure == "ghost" else 3
    t = 0
    for w in range(15):
        steps = list(range(t + 1, t + every + 1))
        t = steps[-1]
        rows = []
        for s in steps:
            eng.lr(s, 1e-3)
            shares = shares_from_slopes(list(rng.normal(size=2) + 2))
            rows += [(f"r{s}_{i}", s, float(sh)) for i, sh in enumerate(shares)]
        d = rng.normal(size=4)
        total += d
        eng.window(steps, rows, d, rng.normal(size=4) if measure == "ghost" else None)
    credited = sum(eng.totals.values()) + eng.residual_total
    np.testing.assert_allclose(credited, total, atol=1e-12)
    assert (np.abs(eng.residual_total).sum() > 0) == (measure == "ghost")


def test_engine_state_round_trips_exactly(tmp_path):
    lrs, deltas, _ = _synthetic(OptimizerKernel("adam", 0.9), T=12)
    a = CreditEngine(OptimizerKernel("adam", 0.9), 6)
    for t, d in enumerate(deltas[:6], start=1):
        a.lr(t, lrs[t])
        a.window([t], [(f"p{t}", t, 1.0)], d)
    meta, arrays = a.state()
    np.savez(tmp_path / "s.npz", **arrays)
    b = CreditEngine.from_state(json.loads(json.dumps(meta)), np.load(tmp_path / "s.npz"), 6)
    for eng in (a, b):
        for t, d in enumerate(deltas[6:], start=7):
            eng.lr(t, lrs[t])
            eng.window([t], [(f"p{t}", t, 1.0)], d)
    assert a.totals.keys() == b.totals.keys()
    for h in a.totals:
        np.testing.assert_array_equal(a.totals[h], b.totals[h])


# ---------------------------------------------------------------- real SFTTrainer runs
def _credits(run_dir):
    c = json.loads((Path(run_dir) / "smda" / "credits.json").read_text())
    p = json.loads((Path(run_dir) / "smda" / "policy.json").read_text())
    return c, p


def _assert_telescopes(run_dir):
    c, p = _credits(run_dir)
    total = np.sum([pr["d"] for pr in c["pairs"]], axis=0) + np.asarray(p["credit"]["residual_total_d"])
    np.testing.assert_allclose(total, np.subtract(p["beta_final"], p["beta_0"]), atol=1e-9)
    return c, p


@pytest.mark.parametrize("measure", ["deconvolve", "ghost"])
def test_adamw_run_credits_telescope_and_carry_momentum(tmp_path, smol_tokenizer, measure):
    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, credit_measure=measure),
            max_steps=5, report_to=[])
    c, p = _assert_telescopes(tmp_path)
    assert c["kernel"]["kind"] == "adam" and c["kernel"]["beta"] == 0.9 and c["measure"] == measure
    recs = [json.loads(line) for line in (tmp_path / "smda" / "attribution.jsonl").read_text().splitlines()]
    assert [r["credit"]["n_carried"] for r in recs] == [0, 1, 2, 3, 4]  # earlier pairs stay in the momentum
    residual = np.abs(p["credit"]["residual_total_d"]).sum()
    assert (residual > 0) == (measure == "ghost")


def test_sgd_without_momentum_optimizer_credit_equals_step_credit(tmp_path, smol_tokenizer):
    for rule in ("optimizer", "step"):
        run_sft(tmp_path / rule, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, credit=rule),
                max_steps=4, report_to=[], optim="sgd", learning_rate=0.05)
    a, _ = _assert_telescopes(tmp_path / "optimizer")
    b, _ = _assert_telescopes(tmp_path / "step")
    assert a["kernel"]["kind"] == "sgd"
    assert [x["hash"] for x in a["pairs"]] == [x["hash"] for x in b["pairs"]]
    for x, y in zip(a["pairs"], b["pairs"]):
        # the two rules reach one number by different float paths: equal to a few ulps, not bitwise (AVX2 vs
        # AVX-512 differed by one ulp here, issue #21)
        assert_ulps_close(x["d"], y["d"])
        assert x["refusal_by_category"].keys() == y["refusal_by_category"].keys()
        for c in x["refusal_by_category"]:
            assert_ulps_close(x["refusal_by_category"][c], y["refusal_by_category"][c])


def test_two_identical_rows_in_one_step_get_half_each(tmp_path, smol_tokenizer, monkeypatch):
    import helpers

    import smda_callback.credit.params as params

    same = pair_records(2)[:1] * 2 + pair_records(2)[1:] * 2
    monkeypatch.setattr(helpers, "pair_records", lambda n=8: same)
    stacked, losses = [], params.causal_lm_row_losses
    monkeypatch.setattr(params, "causal_lm_row_losses", lambda m, b, k=1: stacked.append(k) or losses(m, b, k))
    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=2,
            per_device_train_batch_size=2, report_to=[], pairs=4)
    assert stacked == [2, 2]  # a step's rows in one forward per sign, as many as training put in one
    recs = [json.loads(line) for line in (tmp_path / "smda" / "attribution.jsonl").read_text().splitlines()]
    assert all(r["n_pairs"] == 2 for r in recs)
    shares = [p["credit"] for r in recs for p in r["pairs"]]
    hashes_per_step = [{p["hash"] for p in r["pairs"]} for r in recs]
    for r, hs in zip(recs, hashes_per_step):
        if len(hs) == 1:  # the sampler put two copies of one pair in this step
            assert [p["credit"] for p in r["pairs"]] == pytest.approx([0.5, 0.5], abs=1e-6)
        else:  # one copy of each pair: a real first-order split that still sums to 1
            assert sum(p["credit"] for p in r["pairs"]) == pytest.approx(1.0, abs=1e-12)
    assert shares and any(len(hs) == 1 for hs in hashes_per_step) or pytest.fail(f"no step with identical rows: {hashes_per_step}")
    _assert_telescopes(tmp_path)


def test_a_pair_whose_first_step_has_lr_zero_is_credited_when_its_gradient_acts():
    """Warm-up schedules give step 1 lr 0: pair 1's gradient still enters Adam's moment and acts later."""
    kernel = OptimizerKernel("adam", 0.9)
    eng = CreditEngine(kernel, 3)
    lrs = {1: 0.0, 2: 1e-4, 3: 1e-4}
    rng = np.random.default_rng(0)
    total = np.zeros(3)
    for t in (1, 2, 3):
        eng.lr(t, lrs[t])
        d = rng.normal(size=3) if t > 1 else np.zeros(3)
        total += d
        eng.window([t], [(f"p{t}", t, 1.0)], d)
    assert set(eng.totals) == {"p1", "p2", "p3"} and np.abs(eng.totals["p1"]).sum() > 0
    assert [lv.hash for lv in eng.live] == ["p1", "p2", "p3"]  # pair 1 stays in the momentum after its lr-0 step
    np.testing.assert_allclose(sum(eng.totals.values()) + eng.residual_total, total, atol=1e-15)


@pytest.mark.parametrize("make,decoupled", [
    (lambda p: torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.99), weight_decay=0.1), True),
    (lambda p: torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, foreach=False), True),
    (lambda p: torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, foreach=True), True),
    (lambda p: torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=True), True),
    (lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.7, dampening=0.2, weight_decay=0.1), False),
    (lambda p: torch.optim.SGD([p], lr=0.1, weight_decay=0.1), False),
])
def test_kernel_with_weight_decay_reproduces_torch_updates(make, decoupled):
    """Weight decay > 0: decoupled (AdamW) Δθ_t = −D_t Σ_s c(t,s) g_s − decay_coef(t)·θ_{t−1}; coupled (SGD)
    Δθ_t = −Σ_s c(t,s)(g_s + wd·θ_{s−1}), the decay riding the momentum like a gradient. Both to 1e-9."""
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    opt = make(p)
    kernel, warning = OptimizerKernel.from_optimizer(opt)
    assert warning is None and kernel.weight_decay == 0.1 and kernel.decoupled == decoupled
    grads = [g.double() for g in _grads(6)]
    thetas = [p.detach().clone()]
    for t, g in enumerate(grads, start=1):
        lr = 0.1 / t
        for group in opt.param_groups:
            group["lr"] = lr
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        if decoupled:
            st, b2, eps = opt.state[p], opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
            D = 1.0 / ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + eps)
            want = -D * sum(kernel.coef(t, s, lr) * grads[s - 1] for s in range(1, t + 1)) - kernel.decay_coef(t, lr) * before
        else:
            want = -sum(kernel.coef(t, s, lr) * (grads[s - 1] + 0.1 * thetas[s - 1]) for s in range(1, t + 1))
        torch.testing.assert_close(p.detach() - before, want, rtol=1e-9, atol=1e-12)
        thetas.append(p.detach().clone())


def test_engine_sends_the_decay_part_to_the_residual_and_still_telescopes():
    """Windows = the pairs' linear effects + decay_coef·κ: with κ known, every pair gets exactly its own part
    (the decay never lands on the newest pair) and credits + residual = the summed change."""
    kernel = OptimizerKernel("adam", 0.9, weight_decay=0.1, decoupled=True)
    lrs, deltas, truth = _synthetic(kernel)
    kappa = np.random.default_rng(3).normal(size=6) * 50
    eng = CreditEngine(kernel, 6)
    eng.decay = kappa
    plain = CreditEngine(kernel, 6)  # the old behaviour: decay unknown
    for t, d in enumerate(deltas, start=1):
        d = d + kernel.decay_coef(t, lrs[t]) * kappa
        for e in (eng, plain):
            e.lr(t, lrs[t])
            e.window([t], [(f"p{t}_0", t, 1.0)], d)
    err_new = max(np.abs(eng.totals[h] - v).max() for h, v in truth.items())
    err_old = max(np.abs(plain.totals[h] - v).max() for h, v in truth.items())
    assert err_new < 1e-9 < err_old
    total = sum(eng.totals.values()) + eng.residual_total
    np.testing.assert_allclose(total, sum(d + kernel.decay_coef(t, lrs[t]) * kappa for t, d in enumerate(deltas, 1)),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(eng.decay_total, eng.residual_total, rtol=1e-12)  # deconvolve: the residual is the decay


def test_adamw_weight_decay_run_measures_decay_and_telescopes(tmp_path, smol_tokenizer):
    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=4, report_to=[],
            weight_decay=0.1)
    c, p = _assert_telescopes(tmp_path)
    assert c["kernel"]["decoupled"] and c["kernel"]["weight_decay"] == 0.1
    assert np.abs(p["credit"]["residual_total_d"]).sum() > 0  # the decay's part is explicit, not on a pair


def test_credit_torch_ops_create_no_tensor_off_the_model_device():
    """newest_update, the in-step row slopes and the decay probe under `torch.device("meta")` with the model on
    the CPU: any tensor made without the parameters' device breaks them."""
    from smda_callback.credit import causal_lm_row_losses, row_slopes, trainable_params, with_decayed_weights

    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ids = torch.tensor([[1, 5, 9, 14, 3], [1, 7, 7, 2, 8]])
    batches = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1]), "labels": ids[i:i + 1]} for i in range(2)]
    model(input_ids=ids, labels=ids).loss.backward()
    kernel, _ = OptimizerKernel.from_optimizer(opt)
    params = trainable_params(opt)
    base = [q.detach().clone() for q in params]
    opt.step()
    ref_u = newest_update(opt, kernel, 1)
    ref_s = row_slopes(params, base, ref_u, causal_lm_row_losses(model, batches))
    snap = [q.detach().clone() for q in params]
    with torch.device("meta"):
        u = newest_update(opt, kernel, 1)
        slopes = row_slopes(params, base, u, causal_lm_row_losses(model, batches))
        shrunk = with_decayed_weights(opt, 1e-3, lambda: float(params[1].detach().abs().sum()))
    assert all(x.device.type == "cpu" for x in u)
    np.testing.assert_allclose(slopes, ref_s, rtol=1e-6)
    assert shrunk == pytest.approx(float(snap[1].abs().sum()) * (1 - 1e-3), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(params, snap))  # restored bitwise


def test_bitsandbytes_adamw_is_the_adamw_kernel():
    """QLoRA recipes' optimizers (bitsandbytes, CPU since 0.45): recognised as decoupled AdamW with their weight
    decay, no fallback warning; the 32-bit one's update is the kernel's to float32 precision (the 8-bit one keeps
    quantised moments, which `deconvolve` never reads; only its recognition is checked)."""
    import bitsandbytes as bnb  # the [test] extra installs it
    for cls in (bnb.optim.AdamW, bnb.optim.AdamW8bit, bnb.optim.PagedAdamW):
        p = torch.nn.Parameter(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
        kernel, warning = OptimizerKernel.from_optimizer(cls([p], lr=1e-3, weight_decay=0.01))
        assert warning is None and kernel.kind == "adam" and kernel.decoupled and kernel.weight_decay == 0.01, cls
    # the update, step by step, against Δθ_t = −D_t Σ_s c(t,s) g_s − decay_coef(t)·θ_{t−1} with D_t from v_t
    p = torch.nn.Parameter(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
    opt = bnb.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    kernel, _ = OptimizerKernel.from_optimizer(opt)
    grads = [torch.randn(4096, generator=torch.Generator().manual_seed(10 + t)) for t in range(5)]
    for t, g in enumerate(grads, start=1):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        v = opt.state[p]["state2"]
        D = 1.0 / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        want = -D * sum(kernel.coef(t, s, 1e-2) * grads[s - 1] for s in range(1, t + 1)) - kernel.decay_coef(t, 1e-2) * before
        torch.testing.assert_close(p.detach() - before, want, rtol=1e-3, atol=1e-6)  # two float32 paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newest_update_is_computed_in_slices_and_again_on_each_pass(monkeypatch, dtype):
    """The in-step split holds the newest update one parameter at a time (`NewestUpdate`, one copy of the weights
    fewer): every pass over it gives the same tensors bitwise, sliced or whole, equal to −c·g/(√(v/(1−β₂ᵗ))+ε)
    in fp32 rounded once to the weights' dtype; the split's slopes through it equal those through the list."""
    from smda_callback.credit import causal_lm_row_losses, row_slopes, trainable_params
    from smda_callback.credit import params as cp

    model = tiny_model().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ids = torch.tensor([[1, 5, 9, 14, 3], [1, 7, 7, 2, 8]])
    batches = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1]), "labels": ids[i:i + 1]} for i in range(2)]
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        base = [q.detach().clone() for q in trainable_params(opt)]
        opt.step()
    kernel, _ = OptimizerKernel.from_optimizer(opt)
    whole = cp.newest_update(opt, kernel, 2)
    monkeypatch.setattr(cp, "CHUNK", 3000)  # every parameter of over 3000 elements in several slices, not along rows
    lazy = cp.NewestUpdate(opt, kernel, 2)
    first, second = list(lazy), list(lazy)
    assert len(first) == len(whole) == len(trainable_params(opt))
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, whole))
    group = opt.param_groups[0]
    c = kernel.coef(2, 2, group["lr"])
    for q, u in zip(trainable_params(opt), first):
        v = opt.state[q]["exp_avg_sq"].float() / (1 - group["betas"][1] ** 2)
        assert u.dtype == dtype and torch.equal(u, (-c * q.grad.float() / (v.sqrt() + group["eps"])).to(dtype))
    params, snap = trainable_params(opt), [q.detach().clone() for q in trainable_params(opt)]
    s_lazy = row_slopes(params, base, lazy, causal_lm_row_losses(model, batches))
    s_list = row_slopes(params, base, whole, causal_lm_row_losses(model, batches))
    np.testing.assert_array_equal(s_lazy, s_list)
    assert np.isfinite(s_lazy).all() and np.abs(s_lazy).max() > 0
    assert all(torch.equal(a, b) for a, b in zip(params, snap))  # restored bitwise


def test_newest_update_refuses_an_optimizer_without_a_second_moment_before_any_work():
    from smda_callback.credit import params as cp

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    kernel, _ = OptimizerKernel.from_optimizer(opt)
    del opt.state[p]["exp_avg_sq"]  # as a quantised optimizer keeps it elsewhere
    with pytest.raises(ValueError, match="credit_measure='deconvolve'"):
        cp.NewestUpdate(opt, kernel, 1)


def test_row_losses_of_stacked_rows_are_each_rows_own():
    """The split's rows, right-padded and stacked several to a forward, give each row's own summed loss (to float32
    rounding), in order, whatever their lengths; a batch of several rows is passed through as it is, and the
    slopes along an update, one forward per row or stacked, agree with the same slopes in float64 (a central
    difference of float32 losses carries their rounding, which differs between forwards of different shapes)."""
    from smda_callback.credit import causal_lm_row_losses, row_slopes

    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (3, 9, 5, 12, 7):
        ids = torch.randint(1, 100, (1, n), generator=gen)
        lab = ids.clone()
        lab[0, : n // 2] = -100  # the prompt part carries no loss
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab})
    two = {k: torch.cat([rows[0][k], rows[0][k]]) for k in rows[0]}  # a batch of two equal rows, kept whole
    with torch.no_grad():
        one = causal_lm_row_losses(model, rows, rows_per_forward=1)().numpy()
        for k in (2, 4, 8):
            np.testing.assert_allclose(causal_lm_row_losses(model, rows, rows_per_forward=k)().numpy(), one, rtol=1e-6)
        mixed = causal_lm_row_losses(model, [rows[1], two, rows[2], rows[3]], rows_per_forward=8)().numpy()
    np.testing.assert_allclose(mixed, [one[1], one[0], one[0], one[2], one[3]], rtol=1e-6)
    assert len({round(float(x), 6) for x in one}) == 5
    params = [p for p in model.parameters()]
    base = [p.detach().clone() for p in params]
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    s1 = row_slopes(params, base, direction, causal_lm_row_losses(model, rows, rows_per_forward=1))
    s8 = row_slopes(params, base, direction, causal_lm_row_losses(model, rows, rows_per_forward=8))
    assert all(torch.equal(p, b) for p, b in zip(params, base))
    wide = copy.deepcopy(model).double()
    wide_params = list(wide.parameters())
    ref = row_slopes(wide_params, [b.double() for b in base], [d.double() for d in direction],
                     causal_lm_row_losses(wide, rows, rows_per_forward=1))
    assert len({round(float(x), 3) for x in ref}) == 5
    for s in (s1, s8):
        np.testing.assert_allclose(s, ref, atol=0.01 * np.abs(ref).max())


class _LogitsByPosition(torch.nn.Module):
    """A causal LM whose forward reshapes the head's output by position, as some custom models do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = out.logits.view(*input_ids.shape, self.inner.config.vocab_size)
        return out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "lora", "logits by position"])
def test_row_losses_project_only_the_label_positions(kind):
    """The split's forwards run the output head on the positions that predict a label only (the head sees n_label
    rows, not batch × length), and the row losses equal a float64 loss over full-vocabulary logits at every position;
    a model whose forward needs the head's output by position falls back to every position, with the same losses,
    and is not narrowed again."""
    from smda_callback.credit import causal_lm_row_losses
    from smda_callback.credit import params as cp

    model = tiny_model("qwen2" if kind == "qwen2" else "llama")
    if kind == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if kind == "logits by position":
        model = _LogitsByPosition(model)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in (6, 11, 4, 9):
        ids = torch.randint(1, 100, (1, n), generator=gen)
        lab = ids.clone()
        lab[0, : n // 2] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab})
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    try:
        with torch.no_grad():
            got = causal_lm_row_losses(model, rows, rows_per_forward=4)().numpy()
            seen_first = list(seen)
            again = causal_lm_row_losses(model, rows, rows_per_forward=4)().numpy()
            want = []
            for r in rows:
                logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits[0, :-1].double()
                lab = r["labels"][0, 1:]
                want.append(float(torch.nn.functional.cross_entropy(logits[lab != -100], lab[lab != -100], reduction="sum")))
    finally:
        hook.remove()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(again, got)
    n_labels = sum(int((r["labels"][0, 1:] != -100).sum()) for r in rows)
    if kind == "logits by position":
        assert "RuntimeError" in cp._NARROW_FAILED.get(model, "")  # the view by position failed once
        assert seen_first[-1] == (4, 11, 64)  # every position of the 4 stacked rows, after the one failed try
        assert len(seen) == len(seen_first) + 1 + len(rows)  # not narrowed again: one forward, then the references
    else:
        assert seen_first == [(n_labels, 64)]


def test_row_losses_do_not_hide_an_out_of_memory_behind_the_fallback():
    """Running out of memory in the narrowed forward is the model's problem, not the narrowing's: it is raised as it
    is, and the model stays narrowed for the next call."""
    from smda_callback.credit import causal_lm_row_losses
    from smda_callback.credit import params as cp

    class OutOfMemoryOnce(_LogitsByPosition):
        calls = 0

        def forward(self, input_ids, attention_mask):
            OutOfMemoryOnce.calls += 1
            if OutOfMemoryOnce.calls == 1:
                raise torch.OutOfMemoryError("out of memory (simulated)")
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    model = OutOfMemoryOnce(tiny_model())
    ids = torch.randint(1, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    lab = ids.clone()
    lab[0, :3] = -100
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}]
    with torch.no_grad():
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            causal_lm_row_losses(model, rows)()
        assert model not in cp._NARROW_FAILED
        assert np.isfinite(causal_lm_row_losses(model, rows)().numpy()).all()
    assert model not in cp._NARROW_FAILED


def test_row_losses_reuse_the_logits_when_the_head_sees_flattened_states():
    """A model that calls its head on (batch·length, hidden) states is left alone by the narrowing: the logits of that
    one forward are used at the label positions (no second forward), equal to a float64 loss, and the model is
    remembered as not narrowed."""
    from smda_callback.credit import causal_lm_row_losses
    from smda_callback.credit import params as cp

    class FlatHead(_LogitsByPosition):
        forwards = 0

        def forward(self, input_ids, attention_mask):
            FlatHead.forwards += 1
            h = self.inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            flat = self.inner.get_output_embeddings()(h.reshape(-1, h.shape[-1]))
            return type("Out", (), {"logits": flat.view(*input_ids.shape, -1)})()

    model = FlatHead(tiny_model())
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    lab = ids.clone()
    lab[:, :4] = -100
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}]
    with torch.no_grad():
        got = causal_lm_row_losses(model, rows)().numpy()
        assert FlatHead.forwards == 1
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].double()
    has = lab[:, 1:] != -100
    want = [float(torch.nn.functional.cross_entropy(logits[i][has[i]], lab[i, 1:][has[i]], reduction="sum")) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert "logits of shape (2, 8," in cp._NARROW_FAILED.get(model, "")
