# Self-checks of tutorial/06_schedules.py. tests/test_notebooks.py runs this file as one extra cell
# after the notebook's last cell, in the same kernel: the notebook's names (place_pass, redraw_schedule,
# explorer, shadow_scenario, ...) are defined here. Its last act is to print "self-check passed".
import dataclasses
import itertools

import matplotlib.pyplot as plt
import numpy as np

plt.close("all")
_EPS = 1e-12

# ---- section 1: the tasks come from the cost model -------------------------------------------------
# The two phases, each priced on a machine whose other link is free, add up to the hierarchical exchange.
assert np.isclose(sum(layer.intra) + sum(layer.inter), whole, rtol=1e-12), "phase 1 + phase 2 != alltoall_time"
_t = layer.tasks()
assert np.isclose(_t.exchange_alpha, cost_model.alltoall_time(0.0, CLUSTER["ranks"], 1, layer.hw, True))
# The replicated gradients are the count predict_step uses: one block, no embeddings, its grad_allreduce.
_shape1 = dataclasses.replace(moe_shape(), vocab_size=0, seq_len=0)
_step = cost_model.predict_step(_shape1, cost_model.Layout(1, CLUSTER["ranks"], 1, hierarchical=True), layer.hw)
assert np.isclose(_step["grad_allreduce"], cost_model.allreduce_time(
    sum(n for _, n in layer.grad_sizes), layer.ranks, layer.ranks, layer.hw), rtol=1e-12), "gradient count differs"


# ---- section 2: the timeline obeys its rules -------------------------------------------------------
def _check_pass(lay, degree, backward):
    bars = place_pass(lay, degree, backward)
    there, home = ("grad-gather", "grad-scatter") if backward else ("scatter", "gather")
    for lane in LANES:                                            # one task at a time per lane
        spans = sorted((b.start, b.end) for b in bars if b.lane == lane)
        assert all(a_end <= b_start + _EPS for (_, a_end), (b_start, _) in zip(spans, spans[1:])), lane
    at = {(b.lane, b.label, b.chunk): b for b in bars}
    for c in range(degree):
        for label in (there, home):                              # phase 2 after phase 1
            assert at["inter-node link", label, c].start >= at["intra-node link", label, c].end - _EPS
        assert at["expert compute", "experts", c].start >= at["inter-node link", there, c].end - _EPS
        assert at["intra-node link", home, c].start >= at["expert compute", "experts", c].end - _EPS
    assert len([b for b in bars if b.lane == "expert compute"]) == degree
    return makespan(bars)


for _D in (1, 2, 3, 8, 16, 32):
    for _bw in (False, True):
        _check_pass(layer, _D, _bw)
# The closed form equals the timeline at D = 1 and is never below it (the notebook says so), over settings.
for _G, _tokens, _alpha, _gbps in itertools.product((1, 8, 32), (256, 4096), (1.0, 100.0), (5.0, 100.0)):
    _lay = build_layer(moe_shape(_tokens), machine(_G, _alpha, _gbps))
    for _D in (1, 2, 4, 7, 16):
        for _name, _bw in (("forward", False), ("backward", True)):
            _model = cost_model.predict_layer(_lay.tasks(), _D, _D)[_name]
            _timeline = makespan(place_pass(_lay, _D, _bw))
            assert _timeline <= _model * (1 + 1e-9), (_G, _tokens, _alpha, _gbps, _D, _name)
            if _D == 1:
                assert np.isclose(_timeline, _model, rtol=1e-9), "at D = 1 the timeline is the closed form"
assert (D_f, D_b) == cost_model.choose_pipeline_degrees(layer.tasks(), MAX_DEGREE)

# ---- section 3: gradient pieces ---------------------------------------------------------------------
assert sum(plan["pieces"]) == plan["total"] == sum(n for _, n in layer.grad_sizes)
assert (plan["a"], plan["b"]) == cost_model.allreduce_piece_cost(layer.ranks, layer.ranks, layer.hw)
assert (plan["smallest_bytes"], plan["piece_bytes"]) == cost_model.gradient_piece_bytes(plan["a"], plan["b"],
                                                                                        plan["window"])
# "never one so small that a is more than half of its time (B_min = a/b)"
assert cost_model.PIECE_LATENCY_SHARE == 0.5, "the notebook's text says half"
_b_fit = (plan["window"] - plan["a"]) / plan["b"]
_b_min = plan["a"] / plan["b"]
assert np.isclose(plan["smallest_bytes"], _b_min)
# "the window sets the size (B* = B_fit) and one block's gradients travel as two pieces"
assert _b_fit > _b_min and np.isclose(plan["piece_bytes"], _b_fit) and len(plan["pieces"]) == 2


def _check_gradients(lay, degree):
    without, info_off = backward_with_gradients(lay, degree, partition=False)
    with_, info_on = backward_with_gradients(lay, degree, partition=True)
    assert info_on["backward"] == info_off["backward"] == makespan(place_pass(lay, degree, True)), "pieces moved the pass"
    assert np.isclose(info_off["exposed"], info_off["whole_allreduce"]), "unpartitioned: all of it after the backward"
    assert info_on["exposed"] <= info_off["exposed"] + _EPS * 10
    link = "inter-node link" if lay.ranks > lay.hw.ranks_per_node else "intra-node link"
    busy = [(b.start, b.end) for b in with_ if b.lane == link]
    grad = [b for b in with_ if b.lane == "gradient all-reduce"]
    for g in grad:                                               # the pieces only use the link's idle time
        assert not any(s < g.end - _EPS and g.start < e - _EPS for s, e in busy), (g, "overlaps the exchange")
    work = sum(cost_model.allreduce_time(n, lay.ranks, lay.ranks, lay.hw) for n in info_on["plan"]["pieces"])
    assert np.isclose(sum(g.end - g.start for g in grad), work), "the pieces' time is not their all-reduces' time"
    return info_on, info_off


# "the first piece ... about half of it runs after the backward, and the second ... entirely after it"
assert set(pieces_now) == {0, 1}
assert 0.3 < pieces_now[0]["hidden"] / (pieces_now[0]["hidden"] + pieces_now[0]["exposed"]) < 0.7, pieces_now
assert pieces_now[1]["hidden"] == 0 and pieces_now[1]["exposed"] > 0, pieces_now
# The drawing tells the pieces apart: alternating shades, hidden and exposed alike, and a name per piece.
_fig, _ax = plt.subplots()
draw_timeline(_ax, grad_runs[True][0], D_b, "test", t_max)
_shades = {tuple(np.round(c, 3)) for coll in _ax.collections for c in coll.get_facecolors()}
assert len(_shades & {tuple(np.round(plt.matplotlib.colors.to_rgba(c), 3))
                      for c in ("tab:purple", "plum", "tab:red", "lightsalmon")}) >= 3, _shades
assert {t.get_text() for t in _ax.texts} >= {"piece 1", "piece 2"}, [t.get_text() for t in _ax.texts]
plt.close(_fig)
# "With 256 tokens ... the step gets longer": W < a, B* = B_min, the extra latencies minus what was hidden.
assert few_plan["window"] < few_plan["a"] and np.isclose(few_plan["piece_bytes"], few_plan["smallest_bytes"])
assert few[True]["step"] > few[False]["step"]
assert np.isclose(few[True]["step"] - few[False]["step"], extra_latency - few_hidden, rtol=1e-9)
assert start["step"] < redraw_schedule(partition=False, show=False)["step"]

_on, _off = _check_gradients(layer, D_b)
assert np.isclose(_on["exposed"], on["exposed"]) and on["exposed"] < off["exposed"], "the printout's claim"
_lay_many = redraw_schedule(tokens=256, alpha_inter_us=1.0, show=False)["layer"]   # "more, smaller pieces"
assert len(gradient_plan(_lay_many)["pieces"]) > 1
_check_gradients(_lay_many, 4)
_check_gradients(build_layer(moe_shape(), machine(ranks_per_node=32)), 8)             # one node: NVLink's gaps
assert redraw_schedule(tokens=8192, show=False)["exposed"] < start["exposed"], "more tokens should hide more"

# ---- section 4: the explorer reacts to every control ------------------------------------------------
_base = redraw_schedule(show=False)


def _bars(bars):
    return [(b.lane, b.label, b.chunk, round(b.start, 15), round(b.end, 15)) for b in bars]


def _curves_differ(a, b):
    return not all(np.allclose(a["curves"][n][k], b["curves"][n][k]) for n in a["curves"] for k in ("model", "timeline"))


_other = redraw_schedule(D_f=2, show=False)
assert _bars(_other["forward_bars"]) != _bars(_base["forward_bars"]), "D_f did not change the forward"
assert _bars(_other["backward_bars"]) == _bars(_base["backward_bars"]), "D_f changed the backward"
_other = redraw_schedule(D_b=3, show=False)
assert _bars(_other["backward_bars"]) != _bars(_base["backward_bars"]), "D_b did not change the backward"
assert _bars(_other["forward_bars"]) == _bars(_base["forward_bars"]), "D_b changed the forward"
for _what, _kwargs in {"ranks_per_node": dict(ranks_per_node=4), "tokens": dict(tokens=8192),
                       "d_model": dict(d_model=1024), "alpha_inter_us": dict(alpha_inter_us=200.0),
                       "inter_GBps": dict(inter_GBps=50.0)}.items():
    _other = redraw_schedule(**_kwargs, show=False)
    assert _curves_differ(_other, _base), f"changing {_what} did not change the degree curves"
    assert _bars(_other["forward_bars"]) != _bars(_base["forward_bars"]), f"changing {_what} did not change the timeline"
_other = redraw_schedule(partition=False, show=False)
assert _other["exposed"] > _base["exposed"] and _other["step"] > _base["step"], "the gradient-pieces box did nothing"
# The star sits where the cost model is lowest among the powers of 2 it searches.
for _r in (_base, redraw_schedule(tokens=512, d_model=1024, show=False), redraw_schedule(inter_GBps=3.0, show=False)):
    for _i, _name in enumerate(("forward", "backward")):
        _powers = [D for D in DEGREES if D <= MAX_DEGREE and D & (D - 1) == 0]
        _best = min(_powers, key=lambda D: _r["curves"][_name]["model"][D - 1])
        assert np.isclose(_r["curves"][_name]["model"][_r["chosen"][_i] - 1], _r["curves"][_name]["model"][_best - 1])
# FSMoE's point, as the notebook states it: at the starting point the two passes want different degrees.
assert start["chosen"][0] != start["chosen"][1] and start["step"] < plain["step"]

_controls = {w.description: w for w in explorer.children if hasattr(w, "value")}
assert set(_controls) == {"D_f", "D_b", "ranks/node", "tokens/GPU", "d_model", "α_inter µs", "net GB/s",
                          "gradient pieces"}, set(_controls)
for _label, _value in (("D_f", 8), ("D_b", 2), ("ranks/node", 4), ("tokens/GPU", 4096), ("d_model", 1024),
                       ("α_inter µs", 100.0), ("net GB/s", 50.0), ("gradient pieces", False)):
    _before = explorer.result
    _controls[_label].value = _value
    assert explorer.result is not _before, f"moving {_label} did not redraw"
    assert explorer.result["step"] != _before["step"], f"moving {_label} did not change the step time"
plt.close("all")

# ---- section 5: shadowing ---------------------------------------------------------------------------
for _x in sweep:
    assert _x["after"]["T"] <= _x["before"]["T"], "the greedy policy made T worse"
    for _key, _chosen in (("before", []), ("after", _x["shadowed"])):
        _r, _rates = _x[_key], _x["rates"]
        assert _r["computes"].sum() == _x["counts"].sum(), "rows computed != rows routed"
        # The bars are what predicted_time charges each rank: recompute T from them.
        _per_rank = (4 * np.maximum(_r["sends"], _r["receives"]) * _x["row_bytes"] * _rates.seconds_per_byte
                     + 3 * _r["computes"] * 2 * _x["weights"] * _rates.seconds_per_flop)
        _T = _per_rank.max() + 3 * len(_chosen) * _x["weights"] * MODEL["bytes_per_element"] * _rates.seconds_per_byte
        assert np.isclose(_T, _r["T"], rtol=1e-9), ("bars and predicted_time disagree", _x["skew"], _key)
assert sweep[0]["shadowed"] == [] and first_help is not None and sweep[-1]["after"]["T"] < sweep[-1]["before"]["T"]
_s = redraw_shadowing(skew=1.2, show=False)
assert redraw_shadowing(skew=1.8, show=False)["hot_share"] > _s["hot_share"]
assert not np.array_equal(redraw_shadowing(skew=0.4, show=False)["before"]["computes"], _s["before"]["computes"])
_costly = redraw_shadowing(skew=1.2, cost_ratio=10.0, show=False)                 # "larger: shadow less"
assert len(_costly["shadowed"]) <= len(_s["shadowed"]) and _costly["after"]["T"] >= _s["after"]["T"]
assert redraw_shadowing(skew=1.2, cost_ratio=0.1, show=False)["after"]["T"] <= _s["after"]["T"]
_shadow_controls = {w.description: w for w in shadow_explorer.children if hasattr(w, "value")}
assert set(_shadow_controls) == {"skew", "cost_ratio"}
_before = shadow_explorer.result
_shadow_controls["skew"].value = 2.0
assert shadow_explorer.result["skew"] == 2.0 and shadow_explorer.result["hot_share"] > _before["hot_share"]
_before = shadow_explorer.result
_shadow_controls["cost_ratio"].value = 10.0
assert shadow_explorer.result["after"]["T"] != _before["after"]["T"], "cost_ratio did nothing"
plt.close("all")
# ---- section 6: the measured pass beside the predicted one --------------------------------------------
from _measured_schedule import PARTS
from fastmoe_edu.observe import named_ranges

assert set(passes) == {0, 1} and {r for r, *_ in named_ranges(trace)} == {0, 1}, "a track per rank"
for _rank, _ranges in passes.items():                            # every part of every chunk, once
    assert sorted(n for n, _, _ in _ranges) == sorted(f"pipeline/forward chunk {c} {part}"
                                                      for c in range(MEASURED_DEGREE) for part in PARTS), _rank
    assert all(a_end <= b_start + 1e-6 for (_, _, a_end), (_, b_start, _) in zip(_ranges, _ranges[1:]))
# "the pass is shorter than its tasks one after another" (predicted) / "the parts follow one another" (measured)
assert makespan(predicted_bars) < one_after_another <= measured_s * (1 + 1e-9)
assert 0 < waiting < measured_s
plt.close("all")
print(f"self-check passed ({time.perf_counter() - NOTEBOOK_START:.1f} s since the first cell)")
