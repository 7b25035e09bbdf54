"""Issue 16, in-process: what one token holder could do to the server (settings that protect nothing, idle
uploads, Cancel races, forged log lines, stream floods, other users' jobs, memory) and what it gets now."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from test_server_helpers import (
    bundle_models,
    channel,
    fast_settings,
    header,
    kinds,
    messages,
    one_thread,
    raw_protect,
    running,
    speech,
    stub,
)

from server.gen import cloak_service_pb2 as pb


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus):
    return bundle_models(tmp_path_factory.mktemp("hardening"))[0]


@pytest.fixture(scope="module")
def server(models):
    with running(models, max_batch=2, max_queue=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def ch(server):
    c = channel(server)
    yield c
    c.close()


def _with_settings(audio: np.ndarray, **kw) -> list[pb.ProtectRequest]:
    s = fast_settings(iterations=1)
    for k, v in kw.items():
        if isinstance(v, list):
            getattr(s, k)[:] = v
        else:
            setattr(s, k, v)
    h, data = header(audio, 16000, s)
    return messages(h, data)


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("weights,losses,expect", [
    ([0.0, 0.0, 0.0, 0.0], [], "no enabled loss term has a positive weight"),
    ([0.0, 1.0, 1.0, 1.0], [pb.LOSS_TERM_ID], "no enabled loss term has a positive weight"),
    ([1e308, 1.0, 1.0, 1.0], [], "settings.weights[0] (id)"),
    ([1.0, 1e200, 1.0, 1.0], [], "settings.weights[1] (ctx)"),
    ([1.0, 1.0, 5e-324, 1.0], [], "settings.weights[2] (score)"),
    ([1.0, 1.0, 1.0, float("inf")], [], "settings.weights[3] (sem) must be a finite number"),
    ([1.0, 1.0, float("nan"), 1.0], [], "settings.weights[2] (score) must be a finite number"),
    ([1.0, 1e6 * 1.0001, 1.0, 1.0], [], "must be 0 or in [1e-06, 1e+06]"),
])
def test_weights_that_protect_nothing_are_invalid_argument(ch, server, weights, losses, expect):
    events, code, details = raw_protect(stub(ch), _with_settings(speech(0.5), weights=weights, losses=losses))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert expect in details and details.startswith("settings.weights") and not events
    assert server.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0}


@pytest.mark.parametrize("weights,losses", [
    ([1e6, 0.0, 0.0, 0.0], [pb.LOSS_TERM_ID]),
    ([1e-6, 0.0, 0.0, 0.0], [pb.LOSS_TERM_ID]),
    ([0.0, 0.0, 1e6, 0.0], []),
    ([0.0, 0.0, 1e-6, 0.0], []),
    ([1e6, 1e-6, 1e6, 1e-6], []),
])
def test_extreme_but_valid_weights_still_protect(ch, weights, losses):
    audio = speech(0.5)
    events, code, details = raw_protect(stub(ch), _with_settings(audio, weights=weights, losses=losses))
    assert code == grpc.StatusCode.OK, details
    m = events[-1].done.metrics
    assert m.linf > 0 and not m.warning and 0 < m.snr_db < 200, m


def test_silent_input_says_it_is_not_protected_instead_of_an_snr(ch):
    events, code, details = raw_protect(stub(ch), _with_settings(np.zeros(8000, np.float32)))
    assert code == grpc.StatusCode.OK, details
    assert kinds(events)[-1] == "done"
    m = events[-1].done.metrics
    assert m.linf == 0 and m.snr_db == 0
    assert m.warning.startswith("NOT PROTECTED") and "silent" in m.warning
