import numpy as np

from helpers import probe_records, tiny_model, tiny_sae
from smda_callback import ProbeSet, SMDAConfig, load_records
from smda_callback.lab.counterfactual import attribute_pairs
from smda_callback.lab.report import build_html


def _pairs(n):
    return [{"id": f"p{i}", "prompt": f"Question number {i}: how do I do thing {i}?", "response": "I can't help with that.",
             "label": "harmful" if i % 2 else "harmless", "category": "c" if i % 2 else "d"} for i in range(n)]


def test_counterfactual_is_resumable_restores_base_and_reports(tmp_path, smol_tokenizer):
    model, sae = tiny_model(), tiny_sae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probes = ProbeSet.from_records(probe_records())
    cfg = SMDAConfig.paper(n_features=8)
    attribute_pairs(model, smol_tokenizer, _pairs(3), probes, sae, tmp_path, cfg, lr=1e-2)
    assert all((v == before[k]).all() for k, v in model.state_dict().items())  # base restored bitwise
    recs = load_records(tmp_path)
    assert [r["pairs"][0]["id"] for r in recs] == ["p0", "p1", "p2"]
    attribute_pairs(model, smol_tokenizer, _pairs(4), probes, sae, tmp_path, cfg, lr=1e-2)
    recs = load_records(tmp_path)
    assert [r["pairs"][0]["id"] for r in recs] == ["p0", "p1", "p2", "p3"]  # only the new pair was added
    assert all(r["method"] == "first_order" and np.isfinite(r["delta_beta"]).all() for r in recs)
    assert max(np.abs(r["delta_beta"]).max() for r in recs) > 0
    page = build_html(tmp_path)
    assert "counterfactual" in page and "id='pathways'" in page
