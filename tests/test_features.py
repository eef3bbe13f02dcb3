"""Feature cards drive selection (content only by default), alerts ignore format features, the report
shows the cards with the activating token highlighted, and TensorBoard gets one sub-run per series."""

import json

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import run_sft, tiny_model, tiny_sae
from smda_callback import SMDAConfig
from smda_callback.cli import main
from smda_callback.lab.report import build_html


def _sae_with_cards(tmp_path):
    d = tmp_path / "sae"
    sae = tiny_sae()
    sae.cfg.metadata.neuronpedia_id = "tiny-random/2-res-test"
    sae.save_model(str(d))
    kinds = ["format", "function-word", "content", "content"]
    cards = {str(j): {"label": f"tok{j}", "kind": kinds[j % 4], "max_activation": 1.0,
                      "contexts": [{"text": f"left <b> «tok{j}» right", "activation": 1.0}]} for j in range(256)}
    (d / "feature_cards.json").write_text(json.dumps(cards))
    return d, cards


def test_selection_alerts_report_and_cli_use_the_cards(tmp_path, smol_tokenizer, capsys):
    sae_dir, cards = _sae_with_cards(tmp_path)
    cfg = SMDAConfig(n_features=8, intended_top_m=0, interference_threshold=0.0, min_history=0)
    run_sft(tmp_path / "run", tiny_model(), smol_tokenizer, str(sae_dir), cfg, max_steps=3)
    policy = json.loads((tmp_path / "run" / "smda" / "policy.json").read_text())
    assert policy["features"] and all(cards[str(j)]["kind"] == "content" for j in policy["features"])
    assert set(policy["feature_cards"]) == {str(j) for j in policy["features"]}
    page = build_html(tmp_path / "run")
    assert "id='cards'" in page and "<mark>tok" in page and "&lt;b&gt;" in page
    j0 = policy["features"][0]
    assert f"href='https://www.neuronpedia.org/tiny-random/2-res-test/{j0}'" in page  # each card links its page
    assert "Suspects: pairs ranked by what they did" in page
    # alerts never name a format feature as dominant
    recs = [json.loads(line) for line in (tmp_path / "run" / "smda" / "attribution.jsonl").read_text().splitlines()]
    assert all(cards[str(r["dominant_feature"])]["kind"] != "format" for r in recs)
    capsys.readouterr()
    assert main(["features", "--sae", str(sae_dir), "--run", str(tmp_path / "run"), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert f"f{policy['features'][0]}  tok{policy['features'][0]}  [content]" in out and "«tok" in out
    assert f"page: https://www.neuronpedia.org/tiny-random/2-res-test/{j0}" in out


def test_every_latent_is_eligible_when_the_sae_has_no_cards(tmp_path, smol_tokenizer, caplog):
    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=1, report_to=[])
    assert any("no feature cards" in r.getMessage() for r in caplog.records)


def test_tensorboard_series_get_their_own_runs(tmp_path, smol_tokenizer):
    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=3)
    tb = tmp_path / "smda" / "tensorboard"
    beta_runs = sorted(p for p in (tb / "beta").iterdir())
    assert len(beta_runs) == 8
    ea = EventAccumulator(str(beta_runs[0]))
    ea.Reload()
    assert [e.step for e in ea.Scalars("smda/beta_top")] == [1, 2, 3]
    cats = {p.name: p for p in (tb / "category").iterdir()}
    harmful = EventAccumulator(str(cats["weapons"]))
    harmful.Reload()
    harmless = EventAccumulator(str(cats["cooking"]))
    harmless.Reload()
    assert "smda/category/harmful" in harmful.Tags()["scalars"] and "smda/category/harmless" in harmless.Tags()["scalars"]
    assert np.isfinite([e.value for e in harmful.Scalars("smda/category/harmful")]).all()


def test_behaviour_kinds_on_latents_chosen_by_hand_from_the_shipped_cards():
    """The issue's artefacts: f3057, f1450, f3828 fire on the first word piece of a text with activations of
    1,000–9,500 (position / massive activation); f2598 fires only on "Sm«ol»LM" in the system prompt (template).
    Content latents read by hand stay content: f0 (weight/mass), f1694 (wrong/flaw), f155 (topics in questions)."""
    from smda_callback.features import load_cards
    from smda_callback.sae import embedded_sae_dir

    cards = load_cards(embedded_sae_dir())
    assert {j: cards[j]["kind"] for j in (3057, 1450, 3828)} == {3057: "position", 1450: "position", 3828: "position"}
    assert cards[2598]["kind"] == "template"
    assert {cards[j]["kind"] for j in (0, 1694, 155)} == {"content"}
    assert cards[3057]["token_kind"] == "content"  # the spelling rule alone called it content
    # mixed: f1709 reads ordinary tokens ("Stevens", 30) but its maximum (912 on "Exc«av»ations") is the sink;
    # the full demo's policy chose it (content by the median rule) and gave it its largest coefficient
    assert cards[1709]["kind"] == "position" and cards[1709]["first_position_share"] < 0.3
    assert cards[1709]["contexts"][0]["text"].startswith("Exc «av»")
    # the independent check of the target, from the cards themselves: the policy's content latents have
    # diverse top contexts and no massive activation
    kinds = [c["kind"] for c in cards.values()]
    assert 100 < kinds.count("position") < 400 and 100 < kinds.count("template") < 400


def test_behaviour_kind_rules_from_the_card_alone():
    from smda_callback.features import behaviour_kind

    ctx = lambda texts, acts: [{"text": t, "activation": a} for t, a in zip(texts, acts)]  # noqa: E731
    diverse = [f"left {i} «w{i}» right" for i in range(12)]
    assert behaviour_kind({"kind": "content", "contexts": ctx(diverse, [30.0] * 12)}, 26.0) is None
    assert behaviour_kind({"kind": "content", "contexts": ctx(diverse, [300.0] * 12)}, 26.0) == "position"
    assert behaviour_kind({"kind": "content", "contexts": ctx(["Sm «ol» LM"] * 12, [21.0] * 12)}, 26.0) == "template"
    assert behaviour_kind({"kind": "content", "first_position_share": 0.31, "contexts": ctx(diverse, [5.0] * 12)}, 26.0) == "position"
    assert behaviour_kind({"kind": "content", "template_share": 0.85, "contexts": ctx(diverse, [5.0] * 12)}, 26.0) == "template"
    assert behaviour_kind({"kind": "dead", "contexts": []}, 26.0) is None
    # mixed: one massive activation and some mass at the first positions; either alone is not enough
    mixed = [900.0] + [30.0] * 11
    assert behaviour_kind({"kind": "content", "first_position_share": 0.12, "contexts": ctx(diverse, mixed)}, 26.0) == "position"
    assert behaviour_kind({"kind": "content", "first_position_share": 0.05, "contexts": ctx(diverse, mixed)}, 26.0) is None
    assert behaviour_kind({"kind": "content", "first_position_share": 0.12, "contexts": ctx(diverse, [30.0] * 12)}, 26.0) is None
