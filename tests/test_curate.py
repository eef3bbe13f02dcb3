"""smda curate: removes/fixes the top suspects, caps each label, never fixes a harmful pair into compliance."""

import pytest

from helpers import run_sft, tiny_model, tiny_sae
from smda_callback import SMDAConfig, load_records
from smda_callback.analysis import suspects
from smda_callback.curate import curate
from smda_callback.ledger import load_credits, load_policy


@pytest.fixture(scope="module")
def run(tmp_path_factory, smol_tokenizer):
    import helpers

    tmp = tmp_path_factory.mktemp("curate")
    orig = helpers.pair_records

    def with_ids(n=8):
        return [{**r, "id": f"p{i}"} for i, r in enumerate(orig(n))]
    helpers.pair_records = with_ids
    try:
        run_sft(tmp, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=8, report_to=[])
    finally:
        helpers.pair_records = orig
    pairs = [{"id": r["id"], "prompt": r["prompt"][0]["content"], "response": r["completion"][0]["content"],
              "label": r["label"], "category": r["category"]} for r in with_ids(8)]
    return tmp, pairs


def test_drop_takes_the_top_suspects_within_the_label_cap(run):
    tmp, pairs = run
    ranked = suspects(load_records(tmp), load_policy(tmp), load_credits(tmp), "over-refusal")["id"].tolist()
    out, changes = curate(tmp, pairs, "over-refusal", 3, "drop", max_label_share=0.5)
    dropped = [c["id"] for c in changes]
    assert len(out) == 5 and all(c["action"] == "dropped" for c in changes)
    assert dropped == [i for i in ranked if i in dropped]  # in rank order
    labels = [next(p["label"] for p in pairs if p["id"] == i) for i in dropped]
    assert max(labels.count("harmful"), labels.count("harmless")) <= 2  # 50 % of 4 per label
    assert all("pathway ΔX" in c["why"] and "moved" in c["why"] for c in changes)


def test_fix_rewrites_harmless_pairs_only_and_drops_refusing_answers(run):
    tmp, pairs = run
    answers = iter(["Sure, here is how: first ...", "I'm sorry, but I can't help with that."])
    out, changes = curate(tmp, pairs, "over-refusal", 2, "fix", max_label_share=1.0,
                          answer=lambda prompts: [next(answers) for _ in prompts])
    assert [c["action"] for c in changes] == ["fixed", "dropped"]
    fixed = next(p for p in out if p["id"] == changes[0]["id"])
    assert fixed["response"].startswith("Sure") and fixed["label"] == "harmless" and fixed["curated_from"]
    assert all(next(p for p in pairs if p["id"] == c["id"])["label"] == "harmless" for c in changes)
