"""benchmarks.harness.Timer's GPU rounds, with the device timing replaced by a script (no GPU
needed): the order rotates every round, a row gets one median per round, first-call times come
from round 0 only, and a provider that raises is dropped from later rounds and reported."""

import pytest
import torch

from benchmarks import harness


class _Call:
    """What _gpu_rounds touches of a harness.Call: the timing gets it, a failure clears out."""

    def __init__(self, name):
        self.name, self.out = name, "kept"


def _calls(names):
    return {n: _Call(n) for n in names}


def _scripted_timer(rounds, script, raise_at=None):
    """A Timer whose per-provider GPU timing returns script[name][round] (seconds, a list as
    do_bench's one median or the CUDA events' repetitions) and logs the calls."""
    t = harness.Timer(torch.device("cpu"), reps=3, rounds=rounds)
    log, seen = [], {}

    def fake_gpu(call, on_first):
        name = call.name
        r = seen.get(name, 0)
        seen[name] = r + 1
        log.append((r, name))
        if raise_at == (name, r):
            raise RuntimeError("launch failed\nsecond line")
        if on_first:
            on_first(0.5)
        return script[name][r]

    t._gpu = fake_gpu
    return t, log


def test_rounds_rotate_and_take_round_medians():
    script = {"a": [[3.0], [1.0], [2.0]], "b": [[10.0, 30.0, 20.0], [5.0], [6.0]],
              "c": [[7.0], [7.0], [9.0]]}
    t, log = _scripted_timer(3, script)
    firsts = {}
    errors = {}
    times = t._gpu_rounds(_calls(script), lambda n, s: firsts.__setitem__(n, s), errors)
    assert [n for _, n in log] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert times == {"a": [3.0, 1.0, 2.0], "b": [20.0, 5.0, 6.0], "c": [7.0, 7.0, 9.0]}
    assert harness.median(times["b"]) == 6.0 and min(times["b"]) == 5.0
    assert firsts == {"a": 0.5, "b": 0.5, "c": 0.5} and errors == {}


def test_one_round_keeps_every_repetition():
    script = {"a": [[3.0, 1.0, 2.0]]}
    t, _ = _scripted_timer(1, script)
    assert t._gpu_rounds(_calls("a"), None, {}) == {"a": [3.0, 1.0, 2.0]}


def test_a_provider_that_raises_is_dropped_and_reported():
    script = {"a": [[1.0], [1.0], [1.0]], "b": [[2.0], [2.0], [2.0]]}
    t, log = _scripted_timer(3, script, raise_at=("b", 1))
    calls = _calls("ab")
    errors = {}
    times = t._gpu_rounds(calls, None, errors)
    assert times == {"a": [1.0, 1.0, 1.0]}
    assert errors == {"b": "RuntimeError: launch failed"}
    assert calls["b"].out is None and calls["a"].out == "kept"
    assert [n for _, n in log].count("b") == 2  # not timed in round 2


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        harness.Timer(torch.device("cpu"), reps=3, rounds=0)
