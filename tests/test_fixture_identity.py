"""Bit-identity of the engine against a stored fixture (tests/data/engine_fixture.npz): the same inputs, models
and seeds must give exactly the stored protected audio (np.array_equal), so a refactor that changes any output
bit fails here.

When the output is meant to change, change ENGINE_VERSION in cloak/protect.py and regenerate the fixture:

    python tests/data/make_fixture.py

The cases (small models, ~1 s clips, CPU, one thread, fp32) are defined in tests/data/make_fixture.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from cloak.protect import ENGINE_VERSION

MAKE_FIXTURE = Path(__file__).resolve().parent / "data" / "make_fixture.py"
REGENERATE = "python tests/data/make_fixture.py"


def _load_make_fixture() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_fixture", MAKE_FIXTURE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_fixture = _load_make_fixture()


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    with np.load(make_fixture.FIXTURE) as data:
        return {k: data[k] for k in data.files}


def test_fixture_is_of_this_engine_version(stored: dict[str, np.ndarray]) -> None:
    assert str(stored["engine_version"]) == ENGINE_VERSION, (
        f"the fixture was made by engine {str(stored['engine_version'])!r}, this is {ENGINE_VERSION!r}: if the "
        f"engine's output changed on purpose, regenerate it ({REGENERATE}); a refactor must not change ENGINE_VERSION")


@pytest.mark.parametrize("case", make_fixture.CASES, ids=lambda c: c.name)
def test_protect_output_is_bit_identical_to_the_fixture(case, stored: dict[str, np.ndarray]) -> None:
    got = make_fixture.run_case(case)
    name = case.name
    assert str(got[f"{name}/input_sha256"]) == str(stored[f"{name}/input_sha256"]), \
        f"{name}: the input clip changed (cloak/data/samples), not the engine: regenerate ({REGENERATE})"
    assert str(got[f"{name}/weights_sha256"]) == str(stored[f"{name}/weights_sha256"]), (
        f"{name}: the model's weights differ from the fixture's (torch {str(stored['torch'])} made it; another "
        f"torch may initialise the tiny model differently, or the shipped model changed): regenerate ({REGENERATE})")
    out, want = got[f"{name}/audio"], stored[f"{name}/audio"]
    assert out.shape == want.shape and out.dtype == want.dtype
    diff = float(np.max(np.abs(out.astype(np.float64) - want)))
    assert np.array_equal(out, want), (
        f"{name}: protected audio differs from the fixture (max |difference| {diff:.3g}): the engine's output "
        f"changed. If on purpose, change ENGINE_VERSION and regenerate ({REGENERATE})")
    assert not np.array_equal(out, make_fixture.case_input(case)[0]), f"{name}: the protection changed nothing"
