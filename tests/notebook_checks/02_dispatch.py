# Self-check of tutorial/02_dispatch.py: run by tests/test_notebooks.py as one extra cell after the
# notebook, in the same kernel (so the notebook's globals are available here).
assert all(torch.equal(ref_steps[n], cpu_steps[n]) for n in ref_steps), "numba CPU differs from the reference"
assert all(torch.equal(ref_steps[n], sim["steps"][n]) for n in integer_steps), "CUDA (simulated) integer steps differ"
assert all(torch.allclose(ref_steps[n], sim["steps"][n]) for n in ref_steps), "CUDA (simulated) tensors differ"
# The thread map covers every buffer element exactly once, with the launch configuration shown.
assert (tm["block_of"] >= 0).all() and (tm["thread_of"] >= 0).all()
blocks_, threads_ = big_launch
assert int(tm["block_of"].max()) == blocks_ - 1 and int(tm["thread_of"].max()) <= threads_ - 1
# The racing runs are permutations of the stable rows; the printed claim matches what happened.
assert same_set
assert race_differs == (not torch.equal(atomic_runs[0], atomic_runs[-1]))
# Timings: one median per size and backend, inside its own spread.
for backend_name, values in timings.items():
    assert len(values) == len(TOKEN_COUNTS), backend_name
    assert all(0 < v["min"] <= v["median"] <= v["max"] for v in values), backend_name
assert np.allclose(speedup, [r["median"] / n_["median"] for r, n_ in zip(timings["reference"], timings["numba"])])
assert all(0 < t["min"] <= t["q25"] <= t["median"] <= t["q75"] <= t["max"] for t in layer_times.values())
# The experts alone were timed on the work they do in the layer: its rows (no input gradient), counts, GEMM.
assert not expert_rows.requires_grad and int(expert_counts.sum()) == expert_rows.shape[0]
assert np.isclose(amdahl_bound, 1 / (1 - f_rest)) and experts_differ == (
    ref_x["q25"] > nb_x["q75"] or nb_x["q25"] > ref_x["q75"])
plt.close("all")
print(f"dispatch self-check passed ({time.perf_counter() - NOTEBOOK_START:.1f} s since the first cell)")
