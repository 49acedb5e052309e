"""The tuner from the command line: `fastdiff tune` fills the cache file ahead of time and a second
run reuses it; `fastdiff sample --memory-format auto` measures the model's memory format once per
machine and batch; FASTDIFF_TUNE=0 keeps the static rules; bad options are named."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import fastdiff.nn.conv as conv_module
from fastdiff import tuning
from fastdiff.cli import main
from fastdiff.info import cpu_line

pytest.importorskip("safetensors", reason="safetensors is not installed (a dependency of fastdiff)")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A cache file of this test's own, tuning on, and no choices of earlier tests in the process."""
    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTDIFF_TUNE", "1")
    conv_module.clear_tuning()
    yield tmp_path / "tuning.json"
    conv_module.clear_tuning()


@pytest.fixture
def clock(monkeypatch):
    """The tuner's clock replaced: each candidate "takes" the seconds the test sets (1.0 unless set),
    and every measurement (a convolution's or a memory format's) is counted."""
    timed = {"calls": 0}

    def fake(fns, repeats, min_seconds=0.0, max_repeats=None):
        timed["calls"] += 1
        return {name: [timed.get(name, 1.0)] * repeats for name in fns}

    monkeypatch.setattr(tuning, "alternating_seconds", fake)
    monkeypatch.setattr(tuning, "run_queue_seconds", lambda: 0.0)  # a quiet machine (tests may set otherwise)
    return timed


def _count_measurements(monkeypatch):
    """Count the real measurements (the clock stays real)."""
    calls = []
    real = tuning.alternating_seconds

    def spy(fns, *args, **kwargs):
        calls.append(tuple(fns))
        return real(fns, *args, **kwargs)

    monkeypatch.setattr(tuning, "alternating_seconds", spy)
    return calls


def _entries(path, kind):
    return json.loads(path.read_text())[tuning.machine_key()].get(kind, {})


# ---- fastdiff tune -------------------------------------------------------------------------------


def test_tune_measures_for_real_then_a_second_run_reuses_the_cache(cache, capsys, monkeypatch):
    monkeypatch.setattr(tuning, "MEMORY_FORMAT_SECONDS", 0.0)  # the minimum rounds only: a fast test
    # the timings are real; whether the machine counts as busy is not this test's subject (see below)
    monkeypatch.setattr(tuning, "run_queue_seconds", lambda: None)
    calls = _count_measurements(monkeypatch)
    assert main(["tune", "--model", "digits", "--batch-size", "4"]) == 0
    first = capsys.readouterr().out
    assert f"machine: {cpu_line()}" in first and str(cache) in first
    assert "batch 4 (--batch-size)" in first and "measured now" in first
    formats = _entries(cache, "memory_format")
    assert list(formats) == ["digits batch 4 float32 cpu"]
    decision = formats["digits batch 4 float32 cpu"]
    assert decision["choice"] in ("channels_last", "contiguous") and decision["static"] == "channels_last"
    assert decision["rounds"] == tuning.MEMORY_FORMAT_REPEATS
    assert decision["channels_last_us"] > 0 and decision["contiguous_us"] > 0
    assert ("channels_last", "contiguous") in calls
    lines = [line for line in first.splitlines() if "-> " in line]
    assert any(line.lstrip().startswith("memory_format digits batch 4 float32 cpu") for line in lines)
    convs = _entries(cache, "conv3x3")
    assert len([line for line in lines if line.lstrip().startswith("conv3x3")]) == len(convs)
    if convs:  # the native kernel is built: every 3x3 convolution of the U-Net was measured, both paths
        assert ("fused", "blas", "onednn") in calls
    pointwise = _entries(cache, "conv1x1")  # the U-Net's 1x1 skip convolutions
    assert len([line for line in lines if line.lstrip().startswith("conv1x1")]) == len(pointwise)
    assert len(lines) == len(convs) + len(pointwise) + 1

    calls.clear()
    assert main(["tune", "--model", "digits", "--batch-size", "4"]) == 0
    second = capsys.readouterr().out
    assert calls == []  # nothing measured again
    assert f"all {len(lines)} choices were in the cache {cache}: nothing measured again" in second
    assert set(re.findall(r"(\d+) measured now", second)) <= {"0"}
    again = [line for line in second.splitlines() if "-> " in line]
    assert [line.rsplit(";", 1)[0] for line in again] == [line.rsplit(";", 1)[0] for line in lines]
    assert all(line.endswith("from the cache") for line in again)


def test_tune_again_forgets_and_measures_afresh(cache, capsys, clock):
    assert main(["tune", "--batch-size", "2"]) == 0
    measured = clock["calls"]
    assert measured >= 1
    capsys.readouterr()
    assert main(["tune", "--batch-size", "2", "--again"]) == 0
    out = capsys.readouterr().out
    assert "--again: this machine's cached choices are forgotten" in out and "measured now" in out
    assert clock["calls"] == 2 * measured


@pytest.mark.parametrize(
    ("options", "batches"),
    [
        (["--per-class", "1"], [(10, "fastdiff sample --per-class 1"), (20, "--cfg S (guidance doubles the batch)")]),
        (["--per-class", "1", "--cfg", "4"], [(20, "--cfg S (guidance doubles the batch)")]),
        (["--per-class", "1", "--cfg", "1"], [(10, "fastdiff sample --per-class 1)")]),  # cfg 1: no second half
        (["--batch-size", "3", "5", "3"], [(3, "--batch-size"), (5, "--batch-size")]),
    ],
)
def test_tune_prepares_the_batches_sample_runs(cache, capsys, clock, options, batches):
    assert main(["tune", *options]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("batch ")]
    assert len(headers) == len(batches), headers
    for header, (batch, purpose) in zip(headers, batches, strict=True):
        assert header.startswith(f"batch {batch} (") and purpose in header, header
    assert sorted(_entries(cache, "memory_format")) == sorted(f"digits batch {b} float32 cpu" for b, _ in batches)


def test_tune_default_is_samples_default_batch_with_and_without_guidance(monkeypatch, cache, capsys):
    """Without options: --per-class 8 as sample's default, so batches 80 and 160 (guided). Only the
    batches are checked here: the model's forward is replaced."""
    seen = []

    def choose(model, signature, args, kwargs=None, progress=None):
        seen.append(signature)
        return {"choice": "channels_last", "static": "channels_last", "source": "measured"}

    monkeypatch.setattr(tuning, "choose_memory_format", choose)
    monkeypatch.setattr("fastdiff.models.unet.UNet.forward", lambda self, x, t, y=None: x)
    assert main(["tune"]) == 0
    assert seen == ["digits batch 80 float32 cpu", "digits batch 160 float32 cpu"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--model", "sdxl"], r"argument --model: 'sdxl' is not a shipped model; accepted: digits"),
        (["--model", "glyphs"], r"argument --model: 'glyphs' has nothing to tune .*; accepted: digits"),
        (["--per-class", "0"], r"argument --per-class: must be an int >= 1 .*, got 0"),
        (["--per-class", "-3"], r"argument --per-class: must be an int >= 1 .*, got -3"),
        (["--batch-size", "8", "0"], r"argument --batch-size: each batch must be an int >= 1, got 0"),
        (
            ["--batch-size", "4", "--cfg", "4"],
            r"argument --batch-size: gives the model batches directly; leave out "
            r"--per-class and --cfg",
        ),
        (["--cfg", "nan"], r"argument --cfg: the guidance scale must be a finite number, got nan"),
        (["--batch-size", "two"], r"argument --batch-size: invalid int value: 'two'"),
    ],
)
def test_tune_bad_options_are_named(cache, capsys, clock, options, match):
    with pytest.raises(SystemExit) as exc:
        main(["tune", *options])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fastdiff tune: error: ") and re.search(match, line), line
    assert clock["calls"] == 0 and not cache.exists()


def test_tune_with_tuning_off_or_a_bad_tune_value_is_refused(cache, capsys, clock, monkeypatch):
    monkeypatch.setenv("FASTDIFF_TUNE", "0")
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--batch-size", "2"])
    assert exc.value.code == 2
    assert "FASTDIFF_TUNE=0 turns measuring off" in capsys.readouterr().err
    monkeypatch.setenv("FASTDIFF_TUNE", "yes")
    with pytest.raises(SystemExit):
        main(["tune", "--batch-size", "2"])
    assert re.search(r"FASTDIFF_TUNE must be 1 .* or 0 .*, got 'yes'", capsys.readouterr().err)
    assert clock["calls"] == 0 and not cache.exists()


# ---- fastdiff sample --memory-format -------------------------------------------------------------

_SAMPLE = ["sample", "--steps", "2", "--cfg", "4", "--per-class", "1", "--rounds", "1"]


def test_sample_memory_format_auto_picks_persists_and_reuses(cache, capsys, clock, tmp_path):
    clock.update(channels_last=1.0, contiguous=0.8)  # NCHW faster by more than the margin
    assert main([*_SAMPLE, "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"memory format: NCHW at batch 20 \(measured: channels_last 1000\.0 ms, NCHW 800\.0 ms per "
        r"forward, medians of 7 alternating rounds, busy 0%; NCHW must win by 10%\)",
        out,
    ), out
    assert "backend auto" in out and re.search(r"backend auto .*\(NCHW\)", out)
    assert _entries(cache, "memory_format")["digits batch 20 float32 cpu"]["choice"] == "contiguous"
    calls = clock["calls"]
    conv_module.clear_tuning()  # as a new process would start
    assert main([*_SAMPLE, "--out", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    assert clock["calls"] == calls  # read from the cache file, not measured again
    assert f"memory format: NCHW at batch 20 (cached in {cache}" in out


@pytest.mark.parametrize(
    ("contiguous", "choice"), [(0.8, "contiguous"), (0.95, "channels_last"), (1.2, "channels_last")]
)
def test_memory_format_choice_keeps_channels_last_unless_nchw_wins_by_the_margin(cache, clock, contiguous, choice):
    clock.update(channels_last=1.0, contiguous=contiguous)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    decision = tuning.choose_memory_format(model, "tiny batch 2", (x,))
    assert decision["choice"] == choice and decision["source"] == "measured"
    assert decision["contiguous_us"] == pytest.approx(contiguous * 1e6)
    assert model[0].weight.is_contiguous()  # the model itself is not converted
    assert tuning.choose_memory_format(model, "tiny batch 2", (x,))["source"] == "cache"
    assert clock["calls"] == 1


def test_sample_memory_format_auto_with_tuning_off_is_channels_last_unmeasured(
    cache, capsys, clock, monkeypatch, tmp_path
):
    monkeypatch.setenv("FASTDIFF_TUNE", "0")
    assert main([*_SAMPLE, "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "memory format: channels_last at batch 20 (FASTDIFF_TUNE=0: the static rule)" in out
    assert re.search(r"backend auto .*\(channels_last\)", out)
    assert clock["calls"] == 0 and not cache.exists()


@pytest.mark.parametrize(("name", "shown"), [("contiguous", "NCHW"), ("channels_last", "channels_last")])
def test_sample_explicit_memory_format_is_not_measured(cache, capsys, clock, tmp_path, name, shown):
    clock.update(channels_last=1.0, contiguous=0.5)
    assert main([*_SAMPLE, "--memory-format", name, "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "memory format:" not in out and re.search(rf"backend auto .*\({shown}\)", out)
    assert "memory_format" not in (json.loads(cache.read_text())[tuning.machine_key()] if cache.exists() else {})


def test_sample_bad_tune_value_is_refused_before_sampling(cache, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDIFF_TUNE", "on")
    with pytest.raises(SystemExit) as exc:
        main([*_SAMPLE, "--out", str(tmp_path / "a.png")])
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"fastdiff sample: error: FASTDIFF_TUNE must be 1 .* or 0 .*, got 'on'", line), line
    with pytest.raises(SystemExit):
        main([*_SAMPLE, "--memory-format", "nhwc", "--out", str(tmp_path / "a.png")])
    assert "argument --memory-format: invalid choice: 'nhwc'" in capsys.readouterr().err


# ---- 1x1 convolutions: F.linear over pixels or the module's own convolution ------------------------


def _pointwise_case():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 1)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    return conv, x


def test_conv1x1_choice_is_measured_remembered_and_cached(cache, clock):
    """The static rule picks F.linear on this small map; oneDNN "taking" half the time overturns it,
    the choice is remembered in the process and the file, and a later process reads it unmeasured."""
    conv, x = _pointwise_case()
    clock.update(linear=1.0, onednn=0.5)
    with torch.no_grad():
        out = conv_module.conv1x1_module(conv, x)
        torch.testing.assert_close(out, conv(x), rtol=0, atol=0)  # oneDNN ran: the module's own result
    (decision,) = conv_module.pointwise_decisions()
    assert (decision["choice"], decision["static"], decision["source"]) == ("onednn", "linear", "measured")
    assert decision["shape"] == (2, 16, 8, 8) and decision["out_channels"] == 32
    assert len(_entries(cache, "conv1x1")) == 1
    measured = clock["calls"]
    conv_module.clear_tuning()  # as a new process: the file answers
    with torch.no_grad():
        conv_module.conv1x1_module(conv, x)
    assert clock["calls"] == measured
    assert conv_module.pointwise_decisions()[0]["source"] == "cache"


def test_conv1x1_keeps_the_static_pick_within_the_margin(cache, clock):
    conv, x = _pointwise_case()
    clock.update(linear=1.0, onednn=0.95)  # oneDNN 5% faster: noise, not a reason to switch
    with torch.no_grad():
        out = conv_module.conv1x1_module(conv, x)
    assert conv_module.pointwise_decisions()[0]["choice"] == "linear"
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_conv1x1_static_rule_without_tuning(cache, clock, monkeypatch):
    monkeypatch.setenv("FASTDIFF_TUNE", "0")
    conv, x = _pointwise_case()
    with torch.no_grad():
        torch.testing.assert_close(conv_module.conv1x1_module(conv, x), conv(x), rtol=1e-5, atol=1e-5)
    assert clock["calls"] == 0 and conv_module.pointwise_decisions() == [] and not cache.exists()


def test_compiled_conv1x1_follows_the_measured_choice(cache, clock):
    """torch.compile reads the choice an eager call measured: the traced graph holds F.linear or the
    convolution accordingly."""
    conv, x = _pointwise_case()

    def traced_ops() -> set[str]:
        seen: set[str] = set()

        def backend(gm, example_inputs):
            seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(lambda t: conv_module.conv1x1_module(conv, t), backend=backend, fullgraph=True)(x)
        return seen

    assert any("linear" in op for op in traced_ops())  # nothing measured: the static rule (linear)
    clock.update(linear=1.0, onednn=0.5)
    with torch.no_grad():
        conv_module.conv1x1_module(conv, x)
    ops = traced_ops()
    assert not any("linear" in op for op in ops) and any("conv2d" in op for op in ops), ops


# ---- measuring on a busy machine -----------------------------------------------------------------


def _waits(monkeypatch, per_batch):
    """run_queue_seconds replaced: each measured batch of rounds "waits for a CPU" the next number of
    seconds in ``per_batch`` (the last one repeats), so a test can play a busy spell."""
    state = {"total": 0.0, "reads": 0}

    def fake():
        if state["reads"] % 2:  # the read after a batch: add that batch's wait
            batch = state["reads"] // 2
            state["total"] += per_batch[min(batch, len(per_batch) - 1)]
        state["reads"] += 1
        return state["total"]

    monkeypatch.setattr(tuning, "run_queue_seconds", fake)
    return state


def test_measure_runs_the_candidates_and_reads_the_run_queue():
    """Real runs: medians of each candidate, and how long this process waited for a CPU meanwhile
    (None where the OS does not report it, which counts as steady)."""
    m = tuning.measure({"a": lambda: None, "b": lambda: sum(range(2000))}, repeats=5)
    assert set(m.seconds) == {"a", "b"} and m.rounds >= 5 and 0 < m.seconds["a"] < m.seconds["b"]
    assert m.busy is None or m.busy >= 0
    assert m.steady == (m.busy is None or m.busy <= tuning.BUSY_LIMIT)
    record = m.record()
    assert record["a_us"] == pytest.approx(m.seconds["a"] * 1e6) and record["rounds"] == m.rounds
    waited = tuning.run_queue_seconds()
    assert waited is None or waited >= 0


def test_measure_starts_over_while_the_machine_is_busy(monkeypatch, clock):
    """A batch of rounds during which the process mostly waited for a CPU is not trusted: the tuner
    times a fresh batch, and the first calm one decides."""
    _waits(monkeypatch, [10.0, 0.0])
    m = tuning.measure({"x": lambda: None, "y": lambda: None}, repeats=5)
    assert clock["calls"] == 2 and m.rounds == 5 and m.steady and m.busy == 0.0


def test_measure_gives_up_busy_after_the_round_limit(monkeypatch, clock):
    _waits(monkeypatch, [10.0])
    clock.update(x=1.0, y=2.0)
    m = tuning.measure({"x": lambda: None, "y": lambda: None}, repeats=5)
    assert clock["calls"] == tuning.BUSY_ROUNDS_FACTOR and not m.steady and m.busy > tuning.BUSY_LIMIT
    assert m.seconds == {"x": 1.0, "y": 2.0}  # still the best estimate this process has


def test_measure_without_a_run_queue_counter_is_steady(monkeypatch, clock):
    monkeypatch.setattr(tuning, "run_queue_seconds", lambda: None)
    m = tuning.measure({"x": lambda: None}, repeats=5)
    assert clock["calls"] == 1 and m.busy is None and m.steady and "busy" not in m.record()


def test_a_choice_measured_on_a_busy_machine_is_used_but_not_cached(cache, clock, monkeypatch):
    """The process takes the busy measurement's pick (its best estimate), says once that the machine
    was busy, and leaves the cache file alone, so that a later, quieter process measures again."""
    monkeypatch.setattr(tuning, "_warned", set())  # this test sees the once-per-process warning
    _waits(monkeypatch, [10.0])
    clock.update(linear=1.0, onednn=0.5)
    conv, x = _pointwise_case()
    with pytest.warns(RuntimeWarning, match=r"busy while tuning .*waited for a CPU.*conv1x1 .*not cached"):
        with torch.no_grad():
            out = conv_module.conv1x1_module(conv, x)
    torch.testing.assert_close(out, conv(x), rtol=0, atol=0)  # oneDNN, the faster
    (decision,) = conv_module.pointwise_decisions()
    assert decision["choice"] == "onednn" and decision["busy"] > tuning.BUSY_LIMIT
    assert not cache.exists() or not _entries(cache, "conv1x1")
    conv_module.clear_tuning()  # a new process, on a quiet machine, measures again and caches
    _waits(monkeypatch, [0.0])
    calls = clock["calls"]
    with torch.no_grad():
        conv_module.conv1x1_module(conv, x)
    assert clock["calls"] == calls + 1 and len(_entries(cache, "conv1x1")) == 1
