import json

import numpy as np
import pytest

from helpers import pair_records, run_sft, tiny_model, tiny_sae
from smda_callback import SMDAConfig, load_ledger, load_records


def _tb_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "smda" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sft_run_writes_exact_per_pair_ledger(tmp_path, smol_tokenizer, arch):
    cfg = SMDAConfig(n_features=8)
    trainer, cb, seen = run_sft(tmp_path, tiny_model(arch), smol_tokenizer, tiny_sae(), cfg, max_steps=5, record_rows=True)
    recs = load_records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    # each line's pair is the dataset row actually trained in that step (independent hook above)
    assert [r["pairs"][0]["index"] for r in recs] == seen
    assert all(r["n_pairs"] == 1 and r["pairs"][0]["credit"] == 1.0 and not r["split"] for r in recs)
    assert all(r["pairs"][0]["label"] in ("harmful", "harmless") and r["pairs"][0]["category"] for r in recs)
    policy = json.loads((tmp_path / "smda" / "policy.json").read_text())
    assert policy["final"] and len(policy["features"]) == 8 and "fit" in policy
    # exact split per step, and steps telescope to β_T − β_0
    total = np.zeros(8)
    prev = np.asarray(policy["beta_0"])
    for r in recs:
        d, dx, dy = (np.asarray(r[k]) for k in ("delta_beta", "delta_beta_x", "delta_beta_y"))
        np.testing.assert_allclose(dx + dy, d, atol=1e-9 * max(1.0, np.abs(d).max()))
        np.testing.assert_allclose(np.asarray(r["beta"]) - prev, d, atol=1e-12)
        prev = np.asarray(r["beta"])
        total += d
    np.testing.assert_allclose(total, np.asarray(policy["beta_final"]) - np.asarray(policy["beta_0"]), atol=1e-9)
    assert np.abs(total).sum() > 0  # training moved the policy
    # tidy frame: one row per step × feature
    df = load_ledger(tmp_path)
    assert len(df) == 5 * 8 and set(df["step"]) == {1, 2, 3, 4, 5}
    # TensorBoard events read back, aligned with the ledger's steps
    acc = _tb_tags(tmp_path)
    tags = acc.Tags()["scalars"]
    assert "smda/interference/score" in tags and any(t.startswith("smda/beta/") for t in tags)
    assert any(t.startswith("smda/refusal/") for t in tags)
    assert [e.step for e in acc.Scalars("smda/interference/score")] == [1, 2, 3, 4, 5]
    vals = [e.value for e in acc.Scalars("smda/interference/score")]
    np.testing.assert_allclose(vals, [r["interference"] for r in recs], rtol=1e-6)


@pytest.mark.parametrize("measure,batch", [("deconvolve", 1), ("ghost", 1), ("deconvolve", 2)])
def test_probe_pass_leaves_training_untouched(tmp_path, smol_tokenizer, measure, batch):
    """Same seed with and without the callback: identical weights (mode, RNG and grads untouched), also with the
    ghost pass (θ_{t−1} + u set and restored inside the step) and with the in-step split (batch 2: per-row
    forwards at θ ± εu between the optimizer step and the next forward)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from helpers import pair_records

    m_ref = tiny_model()
    args = SFTConfig(output_dir=str(tmp_path / "ref"), per_device_train_batch_size=batch, max_steps=3, learning_rate=1e-3,
                     report_to=[], save_strategy="no", use_cpu=True, max_length=128, seed=0, disable_tqdm=True)
    SFTTrainer(model=m_ref, args=args, train_dataset=Dataset.from_list(pair_records()), processing_class=smol_tokenizer).train()
    trainer, cb, _ = run_sft(tmp_path / "cb", tiny_model(), smol_tokenizer, tiny_sae(),
                             SMDAConfig(n_features=8, credit_measure=measure), max_steps=3, report_to=[],
                             per_device_train_batch_size=batch)
    recs = load_records(tmp_path / "cb")
    assert all(r["split"] == (batch > 1) for r in recs)  # the path under test ran
    assert all((r["credit"]["ghost"] is not None) == (measure == "ghost") for r in recs)
    for (n, a), (_, b) in zip(m_ref.state_dict().items(), trainer.model.state_dict().items()):
        assert torch_equal(a, b), n


def torch_equal(a, b):
    import torch

    return bool(torch.equal(a, b))


def test_halt_stops_at_the_alerting_step(tmp_path, smol_tokenizer):
    # no intended features → every dominant feature is off-target; no warm-up → alerts from step 1
    cfg = SMDAConfig(n_features=8, intended_top_m=0, interference_threshold=0.0, min_history=0, noise_floor_mads=0.0,
                     on_alert="halt", patience=2)
    trainer, cb, _ = run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), cfg, max_steps=6)
    recs = load_records(tmp_path)
    assert trainer.state.global_step == 2
    assert [r["step"] for r in recs] == [1, 2] and all(r["alert"] for r in recs)
    assert recs[-1].get("halted") and not recs[0].get("halted")
    policy = json.loads((tmp_path / "smda" / "policy.json").read_text())
    assert policy["halted"]["step"] == 2 and policy["n_alerts"] == 2


def test_warn_keeps_training_and_callable_can_halt(tmp_path, smol_tokenizer):
    events = []

    def on_alert(event):
        events.append(event)
        return event.step >= 3

    cfg = SMDAConfig(n_features=8, intended_top_m=0, interference_threshold=0.0, min_history=0, noise_floor_mads=0.0)
    trainer, _, _ = run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), cfg, max_steps=6,
                            callback_kwargs={"on_alert": on_alert})
    assert trainer.state.global_step == 3 and [e.step for e in events] == [1, 2, 3]
    assert events[0].dominant_label.startswith("f") and events[0].pairs[0]["index"] is not None
    trainer, _, _ = run_sft(tmp_path / "warn", tiny_model(), smol_tokenizer, tiny_sae(), cfg, max_steps=3)
    assert trainer.state.global_step == 3


def test_on_alert_string_in_the_constructor_points_to_the_config():
    with pytest.raises(ValueError, match=r"SMDAConfig\(on_alert='halt'\)"):
        from smda_callback import ProbeSet, SMDACallback

        from helpers import probe_records
        SMDACallback(ProbeSet.from_records(probe_records()), tiny_sae(), on_alert="halt")


def test_first_token_scorer_and_paper_preset_run(tmp_path, smol_tokenizer):
    for name, cfg in [("ft", SMDAConfig(n_features=8, scorer="first_token", pooling="max")),
                      ("paper", SMDAConfig.paper(n_features=8))]:
        run_sft(tmp_path / name, tiny_model(), smol_tokenizer, tiny_sae(arch="standard"), cfg, max_steps=2, report_to=[])
        recs = load_records(tmp_path / name)
        assert len(recs) == 2 and all(np.isfinite(r["delta_beta"]).all() for r in recs)
    assert recs[0]["method"] == "first_order"


def test_every_n_steps_windows_are_exact_and_credit_all_pairs(tmp_path, smol_tokenizer):
    _, _, seen = run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, every_n_steps=2),
                         max_steps=5, record_rows=True, report_to=[])
    recs = load_records(tmp_path)
    assert [r["step"] for r in recs] == [2, 4, 5] and [r["window"] for r in recs] == [[1, 2], [3, 4], [5, 5]]
    assert [[p["index"] for p in r["pairs"]] for r in recs] == [seen[0:2], seen[2:4], seen[4:5]]
    assert [p["credit"] for p in recs[0]["pairs"]] == [1.0, 1.0] and recs[0]["split"]  # each alone in its step
    assert [p["step"] for p in recs[0]["pairs"]] == [1, 2]
    policy = json.loads((tmp_path / "smda" / "policy.json").read_text())
    np.testing.assert_allclose(np.sum([r["delta_beta"] for r in recs], axis=0),
                               np.subtract(policy["beta_final"], policy["beta_0"]), atol=1e-9)


def test_scalars_reach_a_second_tracker_mlflow_read_back(tmp_path, smol_tokenizer, monkeypatch):
    """report_to=["mlflow"] with a local file store (offline): the SMDA scalars arrive through trainer.log at
    their own steps, and a callback added after SMDA sees them in on_log."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import TrainerCallback

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "smda-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store: offline, no server
    seen: list[dict] = []

    class After(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs or {}))

    run_sft(tmp_path / "run", tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=3,
            report_to=["mlflow"], callbacks_extra=[After()])
    mlflow.end_run()
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("smda-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    hist = client.get_metric_history(runs[0].info.run_id, "smda/refusal_harmful")
    assert sorted(m.step for m in hist) == [1, 2, 3]
    recs = [json.loads(line) for line in (tmp_path / "run" / "smda" / "attribution.jsonl").read_text().splitlines()]
    by_step = {m.step: m.value for m in hist}
    for r in recs:
        assert by_step[r["step"]] == pytest.approx(r["refusal_harmful"], rel=1e-6)
    names = set(runs[0].data.metrics)
    assert {"smda/refusal_harmless", "smda/interference", "smda/alerts", "smda/credit_residual"} <= names
    assert any(n.startswith("smda/beta/") for n in names) and any(n.startswith("smda/refusal/") for n in names)
    assert any("smda/refusal_harmful" in logs for logs in seen)


def test_push_to_hub_upload_set_holds_no_prompt_text(tmp_path, smol_tokenizer):
    """The files `Trainer.push_to_hub` would upload (its own ignore patterns through huggingface_hub's filter,
    no network) hold no training prompt text by default; the readers still see the prompts."""
    from huggingface_hub.utils import filter_repo_objects

    from smda_callback import load_credits, load_records

    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=3, report_to=[])
    files = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    upload = list(filter_repo_objects(files, ignore_patterns=["_*", "checkpoint-*"]))
    prompts = [p["prompt"][0]["content"] for p in pair_records(8)]
    assert any(f.startswith("smda/") for f in upload) and any(f.startswith("_smda_private/") for f in files)
    for f in upload:
        text = (tmp_path / f).read_bytes().decode("utf-8", errors="ignore")
        assert not any(p in text for p in prompts), f
    assert all(p.get("prompt") for r in load_records(tmp_path) for p in r["pairs"])
    assert all(p.get("prompt") for p in load_credits(tmp_path)["pairs"])


def test_policy_json_carries_the_sae_identity_and_feature_pages(tmp_path, smol_tokenizer):
    sae = tiny_sae()
    sae.cfg.metadata.neuronpedia_id = "tiny-random/2-res-test"
    run_sft(tmp_path, tiny_model(), smol_tokenizer, sae, SMDAConfig(n_features=8), max_steps=2, report_to=["tensorboard"])
    p = json.loads((tmp_path / "smda" / "policy.json").read_text())
    assert p["sae"]["neuronpedia_id"] == "tiny-random/2-res-test" and p["sae"]["hook_name"] == "blocks.2.hook_resid_post"
    assert p["feature_urls"] == {str(j): f"https://www.neuronpedia.org/tiny-random/2-res-test/{j}" for j in p["features"]}
    # TensorBoard links each feature to its page (links only, nothing fetched; the report's are in test_features)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "smda" / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("smda/feature_pages/text_summary")[0].tensor_proto.string_val[0].decode()
    assert all(url in text for url in p["feature_urls"].values())
    assert p["sae_fve_probes"] is not None and p["sae_fve_probes"] < 0.5  # a random SAE reconstructs nothing
