"""smda curate: removes/fixes the top suspects, caps each label, never fixes a harmful pair into compliance."""

from smda_callback import load_records
from smda_callback.lab.analysis import suspects
from smda_callback.lab.curate import curate
from smda_callback.ledger import load_credits, load_policy


def test_drop_takes_the_top_suspects_within_the_label_cap(credit_run):
    tmp, pairs = credit_run
    ranked = suspects(load_records(tmp), load_policy(tmp), load_credits(tmp), "over-refusal")["id"].tolist()
    out, changes = curate(tmp, pairs, "over-refusal", 3, "drop", max_label_share=0.5)
    dropped = [c["id"] for c in changes]
    assert len(out) == 5 and all(c["action"] == "dropped" for c in changes)
    assert dropped == [i for i in ranked if i in dropped]  # in rank order
    labels = [next(p["label"] for p in pairs if p["id"] == i) for i in dropped]
    assert max(labels.count("harmful"), labels.count("harmless")) <= 2  # 50 % of 4 per label
    assert all("pathway ΔX" in c["why"] and "moved" in c["why"] for c in changes)


def test_fix_rewrites_harmless_pairs_only_and_drops_refusing_answers(credit_run):
    tmp, pairs = credit_run
    answers = iter(["Sure, here is how: first ...", "I'm sorry, but I can't help with that."])
    out, changes = curate(tmp, pairs, "over-refusal", 2, "fix", max_label_share=1.0,
                          answer=lambda prompts: [next(answers) for _ in prompts])
    assert [c["action"] for c in changes] == ["fixed", "dropped"]
    fixed = next(p for p in out if p["id"] == changes[0]["id"])
    assert fixed["response"].startswith("Sure") and fixed["label"] == "harmless" and fixed["curated_from"]
    assert all(next(p for p in pairs if p["id"] == c["id"])["label"] == "harmless" for c in changes)
