"""The peer readers compute what they claim: TracIn predicts a small SGD step's effect, and
kronfluence with overwhelming damping reduces to the gradient dot product over its tracked modules."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from helpers import pair_records, probe_records, tiny_model
from smda_callback.lab.peers import _pair_ids, _probe_prompts, kronfluence_scores, tracin_scores, tracked_linear_names
from smda_callback.lab.peers import middle_layers
from smda_callback.probes import ProbeSet

R_IDS = [40, 314, 1000]  # any fixed token ids stand in for the refusal openings on a random model


def _pairs():
    """Demo-format pairs (prompt and response strings) from the helpers' conversational records."""
    return [{"id": f"p{i}", "prompt": r["prompt"][0]["content"], "response": r["completion"][0]["content"],
             "label": r["label"], "category": r["category"]} for i, r in enumerate(pair_records())]


def _refusal(model, tok, probes, mask):
    tok.padding_side = "left"
    enc = tok(_probe_prompts(tok, probes, mask), return_tensors="pt", padding=True, add_special_tokens=False)
    return torch.softmax(model(**enc).logits[:, -1].float(), -1)[:, R_IDS].sum(-1).mean()


def test_tracin_predicts_one_small_sgd_step(smol_tokenizer):
    model, probes, pair = tiny_model(), ProbeSet.from_records(probe_records()), _pairs()[0]
    harmless = ~np.asarray(probes.is_harmful)
    score = tracin_scores(model, smol_tokenizer, [pair], probes, R_IDS)["over-refusal"][pair["id"]]
    with torch.no_grad():
        before = float(_refusal(model, smol_tokenizer, probes, harmless))
    ids, n_prompt = _pair_ids(smol_tokenizer, pair, 256)
    x = torch.as_tensor([ids])
    labels = x.clone()
    labels[:, :n_prompt] = -100
    model.zero_grad()
    model(input_ids=x, labels=labels).loss.backward()
    lr = 1e-3
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
        after = float(_refusal(model, smol_tokenizer, probes, harmless))
    # one SGD step moves f by −lr·⟨∇L, ∇f⟩ = lr·score to first order
    assert after - before == pytest.approx(lr * score, rel=0.05)


def test_tracked_modules_are_block_linears_never_the_head():
    model = tiny_model(layers=6)
    names = tracked_linear_names(model)
    assert names and all(".layers." in n for n in names) and "lm_head" not in names
    mid = tracked_linear_names(model, middle_layers(6))
    assert mid and {n.split(".layers.")[1].split(".")[0] for n in mid} == {"2", "3"}
    assert middle_layers(30) == list(range(10, 20))


def test_kronfluence_with_huge_damping_is_the_dot_product_over_tracked_modules(smol_tokenizer):
    model, tok = tiny_model(), smol_tokenizer
    probes, pairs = ProbeSet.from_records(probe_records()), _pairs()
    layers = [1, 2]
    scores = kronfluence_scores(tiny_model(), tok, pairs, probes, R_IDS, layers=layers, train_batch=3, damping=1e6)
    tracked = dict(model.named_parameters())
    params = [tracked[n + ".weight"] for n in tracked_linear_names(model, layers)]
    harmful = np.asarray(probes.is_harmful)
    for target, mask, sign in (("over-refusal", ~harmful, -1.0), ("compliance", harmful, 1.0)):
        # the measurement is the summed refusal mass of the group, the train loss the summed token CE
        g_q = torch.autograd.grad(_refusal(model, tok, probes, mask) * int(mask.sum()), params)
        ref = []
        for p in pairs:
            ids, n_prompt = _pair_ids(tok, p, 256)
            x = torch.as_tensor([ids])
            labels = x.clone()
            labels[:, :n_prompt] = -100
            logits = model(input_ids=x).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
            g_t = torch.autograd.grad(loss, params)
            ref.append(sign * float(sum((a * b).sum() for a, b in zip(g_q, g_t))))
        got = [scores[target][p["id"]] for p in pairs]
        assert spearmanr(got, ref).statistic > 0.95, (target, got, ref)
        assert np.sign(got).tolist() == np.sign(ref).tolist()


def test_a_peer_runs_in_its_own_process_and_reports_time_and_memory(tmp_path, smol_tokenizer):
    """The benchmark's harness: a finished poison folder in, peers/<name>.json with one score per pair
    and target, the child's own wall time and peak RSS out; score_poison then ranks with it."""
    import json

    from smda_callback.lab.peers import run_peer

    tiny_model().save_pretrained(tmp_path / "run" / "model")
    smol_tokenizer.save_pretrained(tmp_path / "run" / "model")
    pairs = _pairs()
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "probes_at_run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probe_records()))
    res = run_peer(tmp_path, "kronfluence-middle")
    saved = json.loads((tmp_path / "peers" / "kronfluence-middle.json").read_text())
    assert saved == res and res["seconds"] > 0 and res["peak_rss_mb"] > 100
    for target in ("over-refusal", "compliance"):
        assert sorted(res["scores"][target]) == sorted(p["id"] for p in pairs)
        assert all(np.isfinite(v) for v in res["scores"][target].values())
    with pytest.raises(ValueError, match="unknown peer"):
        run_peer(tmp_path, "datamodels")
