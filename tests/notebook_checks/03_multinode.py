# Self-check of tutorial/03_multinode.py: run by tests/test_notebooks.py as one extra cell after the
# notebook, in the same kernel (so the notebook's globals are available here).
# The cost explorer's callback must react to every control that applies: call redraw_cost with
# different values, move the widgets, and check that the plotted numbers changed (or, for the
# bandwidth in "measured here" mode, that they did not and the slider is disabled).
base = redraw_cost(gpus=256, bandwidth_GBps=50.0, experts_per_gpu=2, show=False)


def plotted_differs(a, b):
    return not all(np.allclose(a[key], b[key]) for key in ("compute", "flat", "hier"))


for what, kwargs in {"bandwidth": dict(bandwidth_GBps=5.0), "experts_per_gpu": dict(experts_per_gpu=16),
                     "network": dict(network="measured here")}.items():
    other = redraw_cost(**{**dict(gpus=256, bandwidth_GBps=50.0, experts_per_gpu=2, show=False), **kwargs})
    assert plotted_differs(other, base), f"changing {what} did not change the plotted data"
moved = redraw_cost(gpus=2048, bandwidth_GBps=50.0, experts_per_gpu=2, show=False)
assert moved["at_gpus"] != base["at_gpus"], "changing the GPU count did not change the bars"

# "measured here": one shared link, so the bandwidth slider has no effect and communication grows with P.
here_a = redraw_cost(bandwidth_GBps=50.0, network="measured here", show=False)
here_b = redraw_cost(bandwidth_GBps=5.0, network="measured here", show=False)
assert not plotted_differs(here_a, here_b), "the bandwidth changed a 'measured here' plot"
assert all(np.diff(here_a["flat"]) > 0), "flat all-to-all time must grow with P on one shared link"
assert all(np.diff(base["flat"]) > 0), "flat all-to-all time must grow with P with cluster numbers"
assert bandwidth_slider.max <= math.log10(CLUSTER["link_GBps"]) + 1e-9, "network faster than NVLink offered"

# The explorer prices the all-to-all as cost_model.py does: at P = 8 (one node) flat = hierarchical in both
# modes, and the legend's "who is faster" text is what the plotted numbers say.
assert formula_gap < 1e-12, formula_gap
for _network in ("cluster", "measured here"):
    for _epg in (1, 2, 16):
        _r = redraw_cost(experts_per_gpu=_epg, network=_network, show=False)
        assert np.isclose(_r["flat"][0], _r["hier"][0], rtol=1e-12), (_network, "P = 8 is one node")
        for _P, _f, _h, _w in zip(GPU_COUNTS, _r["flat"], _r["hier"], _r["winners"]):
            assert _w == ("equal" if np.isclose(_f, _h, rtol=1e-3) else "hierarchical" if _h < _f else "flat")
        if _r["crossover"] is not None:
            assert all(_w == "hierarchical" for _P, _w in zip(GPU_COUNTS, _r["winners"]) if _P >= _r["crossover"])

controls = {w.description: w for w in cost_explorer.children if hasattr(w, "value")}
before = cost_explorer.result
controls["GPUs"].value = 4096
assert cost_explorer.result is not before and cost_explorer.result["at_gpus"]["flat"] > before["at_gpus"]["flat"]
controls["net GB/s"].value = 10.0
assert cost_explorer.result["at_gpus"]["hier"] > step_time(4096, 50.0, 2)["hier"]
assert not controls["net GB/s"].disabled
controls["network"].value = "measured here"
assert controls["net GB/s"].disabled, "the bandwidth slider must be disabled in 'measured here' mode"
controls["network"].value = "cluster"
assert not controls["net GB/s"].disabled
controls["GPUs"].value, controls["net GB/s"].value = 256, 50.0

# Section 3: the fit uses only launches where every rank has its own core; verdicts match the numbers.
assert all(p["ranks"] <= max(CORES, 2) for p in fit_points)
assert all(p["ranks"] > CORES for p in over_points)
assert all(p["seconds_min"] <= p["seconds"] <= p["seconds_max"] for p in bench_points)
# A verdict holds over the whole spread of the timings; a spread that crosses the bound is "too noisy".
for r in rows_pred:
    low, high = r["ratio_range"]
    assert low <= r["ratio"] <= high, r
    if r["P"] > CORES:
        assert r["verdict"] == "oversubscribed"
    elif r["P"] == 1:
        assert r["verdict"] == "model input"
    else:
        assert r["launches"] == PROBE_LAUNCHES >= 2, "a judged size must be launched more than once"
        inside, outside = 1 / TOLERANCE <= low and high <= TOLERANCE, high < 1 / TOLERANCE or low > TOLERANCE
        assert r["verdict"] == ("agrees" if inside else "DISAGREE" if outside else "too noisy to judge"), r
assert len(probes) == len(RANK_COUNTS) and all(r["forward_measured"] > 0 for r in rows_pred)
# Section 2: the locality claims printed are the ones the matrices show.
assert np.isclose(local_share, np.trace(traffic) / traffic.sum())
assert np.isclose(local_share_aligned, np.trace(traffic_aligned) / traffic_aligned.sum())
# Section 4: the pipeline-degree search.
assert all(1 <= best <= MAX_DEGREE for best in best_degrees)
assert all(dropped < kept for dropped, kept in zip(ted_steps["tp4 drop"], ted_steps["tp4"])), \
    "the cost model should price dropping duplicate tokens below sending tp copies"
# Section 5: the measured TED table says what the text claims.
assert set(ted_results) == set(bench_ted.VARIANTS) and replayed
assert 0.45 <= alltoall["drop (combined)"] / alltoall["baseline"] <= 0.55
assert experts_ratio == 0.5
# The explanation of dropping's extra bytes: the expert gradients summed over tp, a ring all-reduce of them.
assert TED_DP == 1 and summed == 2 * (TED_TP - 1) / TED_TP * expert_bytes
assert total["drop (combined)"] > total["baseline"] and 0 < saved < summed
assert "expert gradients summed over tp" not in ted_results["baseline"]["bytes_per_step"]
assert "expert gradients summed over tp" not in ted_results["drop + tensor-parallel experts"]["bytes_per_step"]
assert ted["output_summary"] == bench_ted.summarize_output(ted["output"]) and "\n" not in ted["output_summary"]
plt.close("all")
print(f"widget self-check passed ({time.perf_counter() - NOTEBOOK_START:.1f} s since the first cell)")
