import json
from pathlib import Path

import numpy as np
import pytest

from cloak.files import finite_json, jsonable, read_json, replace_atomically, write_json, write_text_atomic


def test_failed_write_leaves_the_target_and_no_partial_file(tmp_path):
    target = tmp_path / "settings.cfg"
    target.write_text("old", encoding="utf-8")

    def fail(tmp: Path) -> None:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("stopped mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        replace_atomically(target, fail)
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.cfg"]


def test_text_and_json_round_trip_through_new_directories(tmp_path):
    text = tmp_path / "a" / "b" / "report.md"
    write_text_atomic(text, "caf\udce9", errors="surrogateescape")
    assert text.read_bytes() == b"caf\xe9"
    path = tmp_path / "c" / "report.json"
    write_json(path, {"p": Path("x/y"), "n": np.float32(0.5), "a": np.arange(2), "t": (1, 2)})
    assert read_json(path) == {"p": "x/y", "n": 0.5, "a": [0, 1], "t": [1, 2]}
    assert read_json(tmp_path / "missing.json") is None


def test_json_conventions_are_strict(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        json.dumps(object(), default=jsonable)
    assert finite_json({"a": [float("nan"), 1.0, (float("inf"),)]}) == {"a": [None, 1.0, [None]]}
    with pytest.raises(ValueError):
        write_json(tmp_path / "nan.json", float("nan"))
    assert not (tmp_path / "nan.json").exists()
