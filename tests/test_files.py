import json

import numpy as np
import pytest


def test_write_json_replaces_the_file_whole_and_leaves_no_temp(tmp_path):
    from smda_callback.lab.files import write_json

    path = tmp_path / "job.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": np.float32(0.5)}, default=float)  # a numpy scalar through `default`, as retrain writes them
    assert json.loads(path.read_text()) == {"b": 0.5} and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(TypeError):
        write_json(path, {"c": np.float32(1.0)})  # without `default` json cannot write it ...
    assert json.loads(path.read_text()) == {"b": 0.5}  # ... and the finished file is left as it was
