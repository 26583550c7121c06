"""The measurement helpers behind `bsbert bench`'s ratios."""
import time

import torch

from bsbert.timing import dense_gemm_probe, paired_bound_ratio, paired_time_ratio, time_fn, time_in_trials


def test_paired_ratio_of_the_probe_itself_is_one():
    probe, flops = dense_gemm_probe("torch-dense", "cpu", torch.float32, m=64, k=256, n=512)

    def twice():
        probe()
        probe()

    r = paired_bound_ratio(twice, probe, flops, 2 * flops, rounds=7)
    assert 0.7 <= r["median"] <= 1.4, r  # same work at the same rate: ratio ~1
    assert r["min"] <= r["median"] <= r["max"] and r["rounds"] == 7


def test_paired_ratio_scales_with_the_claimed_work():
    probe, flops = dense_gemm_probe("torch-dense", "cpu", torch.float32, m=64, k=256, n=512)
    # claiming half the FLOPs that were done doubles time / bound
    r = paired_bound_ratio(probe, probe, flops, flops / 2, rounds=7)
    assert 1.4 <= r["median"] <= 2.8, r


def test_time_fn_warms_up_for_a_count_and_for_a_time():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.002)

    r = time_fn(fn, repeats=4, warmup=3)
    assert len(calls) == 3 + 4 and r["repeats"] == 4
    calls.clear()
    t0 = time.perf_counter()
    time_fn(fn, repeats=2, warmup=1, warmup_s=0.05)
    warm = calls[:-2]  # the last two calls are the timed ones
    assert len(warm) >= 5 and calls[-2] - t0 >= 0.05  # warmed up for 50 ms, not just one call


def test_time_in_trials_spreads_the_timed_calls_between_probes():
    events = []
    groups = []  # index in events where each run of probe calls starts

    def probe():
        if not events or events[-1] == "f":
            groups.append(len(events))
        events.append("p")

    def fn():
        events.append("f")
        time.sleep(0.02 if len(groups) == 2 else 0.002)  # slow during the second block only (10x)

    r = time_in_trials(fn, probe, 1e6, trials=3, repeats=4, warmup=2, probe_rounds=2)
    assert r["repeats"] == 12 and len(r["times_ms"]) == 12 and len(r["trials"]) == 3
    assert len(groups) == 4 and len(r["probe_gflops"]) == 4 and all(g > 0 for g in r["probe_gflops"])
    # between probes: 2 warm-up calls + 4 timed (first block), then 1 re-warm call + 4 timed
    runs = [len(x) for x in "".join(events).split("p") if x]
    assert runs == [2 + 4, 1 + 4, 1 + 4]
    # the slow block moved its own median, not the median over all twelve calls
    medians = [b["median_ms"] for b in r["trials"]]
    assert medians[1] > 3 * max(medians[0], medians[2]) and r["median_ms"] < medians[1] / 2
    assert [b["probe_gflops"] for b in r["trials"]] == [r["probe_gflops"][i:i + 2] for i in range(3)]


def test_paired_time_ratio_alternates_and_takes_the_median_of_the_pairs():
    calls = []

    def sleeper(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    r = paired_time_ratio(sleeper("a", 0.006), sleeper("b", 0.002), rounds=6)
    # one untimed call of each, then rounds alternating which goes first
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert r["rounds"] == 6 and r["min"] <= r["median"] <= r["max"]
    assert 2.0 < r["median"] < 4.0  # 6 ms over 2 ms, with a sleep's overshoot on a busy machine
    assert r["a_median_ms"] >= 6.0 and r["b_median_ms"] >= 2.0


def test_synchronizer_waits_for_the_named_gpu_not_the_current_one(monkeypatch):
    from bsbert import timing
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(device))
    timing._synchronizer("cuda:1")()
    timing._synchronizer(torch.device("cuda", 3))()
    timing._synchronizer("cpu")()
    assert seen == [torch.device("cuda", 1), torch.device("cuda", 3)]


def test_device_problem_names_a_gpu_index_that_is_not_there(monkeypatch):
    from bsbert.devices import device_problem
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    dev, why = device_problem("cuda:7")
    assert dev == torch.device("cuda", 7) and "no GPU 7" in why and "sees 2" in why, why
    assert device_problem("cuda:1") == (torch.device("cuda", 1), None)
    assert device_problem("cuda") == (torch.device("cuda"), None)


def test_graph_timing_captures_on_the_calls_gpu(monkeypatch):
    """Streams, graphs and events are made on the current GPU: a model on cuda:1 while cuda:0 is current had
    its candidates captured (empty) on cuda:0. rank_by_time passes the input's device; timing enters it."""
    from bsbert import timing
    from bsbert.ops import dispatch

    seen = []

    class Device:
        def __init__(self, d):
            seen.append(d)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(timing, "_best_of_interleaved_graphs", lambda fns, rounds, replays: [1e-3] * len(fns))
    x = torch.empty(2, device="meta")
    order, ms, reason = dispatch.rank_by_time({"a": lambda t: t, "b": lambda t: t}, x, "test", gpu=True)
    assert seen == [x.device] and ms == {"a": 1.0, "b": 1.0} and "GPU time" in reason
