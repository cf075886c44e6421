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
for r in rows_pred:
    if r["P"] > CORES:
        assert r["verdict"] == "oversubscribed"
    elif r["verdict"] == "agrees":
        assert 1 / TOLERANCE <= r["ratio"] <= TOLERANCE
    elif r["verdict"] == "DISAGREE":
        assert not 1 / TOLERANCE <= r["ratio"] <= TOLERANCE
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
plt.close("all")
print(f"widget self-check passed ({time.perf_counter() - NOTEBOOK_START:.1f} s since the first cell)")
