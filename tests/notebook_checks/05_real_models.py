# Self-checks of tutorial/05_real_models.py. tests/test_notebooks.py runs this file as one extra cell
# after the notebook's last cell, in the same kernel: the notebook's names (route, draw, controls,
# shown, moefy_differences, log, ...) are defined here. Its last act is to print "self-check passed".
import numpy as np
import matplotlib.pyplot as plt

plt.close("all")
_T = NUM_SEQUENCES * SEQ_LEN

# Section 2: the four routers, as the text describes them.
_by_family = {r["family"]: r for r in comparison}
assert list(_by_family) == ["Mixtral", "Qwen2-MoE", "DeepSeek-V3", "Switch"]
for _r in comparison:
    assert _r["combine"].shape == (_T, NUM_EXPERTS)
    assert ((_r["combine"] > 0).sum(1) <= _r["top_k"]).all(), f"{_r['family']}: more than k experts per token"
    if _r["class"] in hf.SUPPORTED:           # from_hf(block) computes the block's function
        assert _r["from_hf_difference"] < 1e-5 * max(1.0, _r["output_scale"]), (_r["family"], _r["from_hf_difference"])
        assert _r["unsupported_reason"] is None
    else:
        assert _r["from_hf_difference"] is None and _r["unsupported_reason"] == hf.UNSUPPORTED[_r["class"]][1]
assert {"MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "DeepseekV3MoE"} <= {
    r["class"] for r in comparison if r["from_hf_difference"] is not None}
_mixtral, _qwen, _deepseek, _switch = (_by_family[f] for f in ("Mixtral", "Qwen2-MoE", "DeepSeek-V3", "Switch"))
# Mixtral renormalises (Σw = 1), this Qwen2-MoE does not (Σw < 1); same W, same softmax: the same choices.
assert np.allclose(_mixtral["weight_sum"], 1.0, atol=1e-5) and (_qwen["weight_sum"] < 1 - 1e-3).all()
assert np.array_equal(_mixtral["combine"] > 0, _qwen["combine"] > 0), "Mixtral and Qwen2-MoE chose differently"
# DeepSeek-V3: weights sum to the routed scaling factor; choices only inside TOPK_GROUP groups; it differs.
assert np.allclose(_deepseek["weight_sum"], ROUTED_SCALING, atol=1e-4)
_groups_used = (_deepseek["combine"] > 0).reshape(_T, N_GROUP, -1).any(axis=2).sum(axis=1)
assert (_groups_used <= TOPK_GROUP).all()
assert not np.array_equal(_deepseek["combine"] > 0, _mixtral["combine"] > 0), "DeepSeek-V3 chose as Mixtral did"
# Switch: top-1, weight = the probability (< 1), at most C kept tokens per expert and sequence, some dropped.
assert _switch["top_k"] == 1 and (_switch["weight_sum"] < 1).all()
_kept_per_sequence = (_switch["combine"] > 0).reshape(NUM_SEQUENCES, SEQ_LEN, NUM_EXPERTS).sum(axis=1)
assert _kept_per_sequence.max() <= SWITCH_CAPACITY
assert _switch["dropped_mask"].sum() > 0 and (_switch["weight_sum"][_switch["dropped_mask"].any(1)] == 0).all()
for _r in (_mixtral, _qwen, _deepseek):
    assert not _r["dropped_mask"].any(), f"{_r['family']} is dropless but dropped tokens"

# draw(...) plots what route(...) returned: one heat map per family, with the data.
_fig = draw(comparison)
_heat_axes = [ax for ax in _fig.axes if ax.images and ax.get_label() != "<colorbar>"]
assert len(_heat_axes) == 4, len(_heat_axes)
for _ax, _r in zip(_heat_axes, comparison):
    assert np.array_equal(_ax.images[0].get_array(), _r["combine"]), f"{_r['family']}: the heat map is not the data"
    assert _ax.get_title().startswith(_r["family"])
    assert np.isclose(_ax.images[0].get_clim()[1], _r["combine"].max()), f"{_r['family']}: not scaled to its own data"
assert sum(ax.get_label() == "<colorbar>" for ax in _fig.axes) == 4, "one colour bar per heat map"
plt.close(_fig)

# route(...) reacts to top_k; Switch ignores it (top-1 by construction).
assert not np.array_equal(route("Mixtral", 1)["combine"], route("Mixtral", 3)["combine"])
assert ((route("Qwen2-MoE", 4)["combine"] > 0).sum(1) == 4).all()
assert route("Switch", 3)["top_k"] == 1 and np.array_equal(route("Switch", 3)["combine"], _switch["combine"])

# The widgets: each change redraws with the new value; Switch forces k = 1 and greys the slider.
assert set(controls) == {"family", "top_k"}
_before = shown["data"]
controls["top_k"].value = 3
assert shown["data"] is not _before and shown["data"]["top_k"] == 3 and shown["data"]["family"] == "Mixtral"
assert ((shown["data"]["combine"] > 0).sum(1) == 3).all()
controls["family"].value = "DeepSeek-V3"
assert shown["data"]["family"] == "DeepSeek-V3" and shown["data"]["top_k"] == 3
controls["family"].value = "Switch"
assert shown["data"]["family"] == "Switch" and shown["data"]["top_k"] == 1
assert controls["top_k"].value == 1 and controls["top_k"].disabled
controls["family"].value = "Qwen2-MoE"
assert not controls["top_k"].disabled and shown["data"]["family"] == "Qwen2-MoE"
controls["top_k"].value = 2
assert np.array_equal(shown["data"]["combine"], _qwen["combine"])
controls["family"].value = "Mixtral"
_data = redraw("DeepSeek-V3", 4)                       # the function the widgets call, with other values
assert _data["family"] == "DeepSeek-V3" and ((_data["combine"] > 0).sum(1) == 4).all()
plt.close("all")

# Section 4: moefy swapped both blocks; logits, HF's aux loss, loss and all gradients agree.
assert sum(isinstance(m, HFMoEBlock) for m in swapped.modules()) == 2
assert not any(type(m).__name__ == "MixtralSparseMoeBlock" for m in swapped.modules())
assert out_hf.aux_loss is not None and out_ours.aux_loss is not None
for _what, (_ours, _theirs) in moefy_report.items():
    _scale = float(_theirs.detach().abs().max())
    assert moefy_differences[_what] <= 1e-5 * max(_scale, 1.0), (_what, moefy_differences[_what])
assert len(pairs) == sum(1 for _ in original.parameters())   # every HF parameter's gradient was compared

# Section 5: upcycling starts equal, both models train, the experts diverge, the plot shows the log.
assert sum(isinstance(m, MoELayer) for m in upcycled.modules()) == 2
assert not any(isinstance(m, MoELayer) for m in dense.modules())
assert upcycle_difference < 1e-4 * max(1.0, float(dense_logits.abs().max())), upcycle_difference
assert len(log["dense"]) == len(log["upcycled"]) == len(log["load"]) == STEPS and len(log["spread"]) == STEPS + 1
assert abs(log["dense"][0] - log["upcycled"][0]) < 1e-4, "the upcycled model did not start where the dense one was"
assert pretrain_loss[-1] < pretrain_loss[0] and log["dense"][-1] < pretrain_loss[0]
_tail = max(1, STEPS // 10)
assert np.mean(log["upcycled"][-_tail:]) < np.mean(log["upcycled"][:_tail]), "the upcycled model did not learn"
assert log["spread"][0] == [0.0, 0.0] and min(log["spread"][-1]) > 0.01, log["spread"][-1]
assert count(upcycled) > count(upcycled, active=True) > count(dense)
assert set(val_loss) == {"dense", "upcycled"} and all(np.isfinite(v) for v in val_loss.values())
_fig, _axes = plt.subplots(2, 2)
_axes = _axes.ravel()
draw_training(_axes, log)
_lines = {line.get_label(): line for line in _axes[0].lines}
assert np.allclose(_lines["upcycled"].get_ydata(), moving_average(log["upcycled"]))
assert np.allclose(_lines["dense, pre-training"].get_ydata(), pretrain_loss)
assert np.allclose(_axes[1].lines[0].get_ydata(), moving_average(log["upcycled"]) - moving_average(log["dense"]))
assert len(_axes[2].lines) == 2 and np.allclose(_axes[2].lines[1].get_ydata(), np.array(log["spread"])[:, 1])
_half = {key: value[: STEPS // 2] for key, value in log.items() if key != "pretrain"}
draw_training(_axes, {**_half, "pretrain": pretrain_loss, "spread": log["spread"][: STEPS // 2 + 1]})
assert len({line.get_label(): line for line in _axes[0].lines}["upcycled"].get_ydata()) < len(
    _lines["upcycled"].get_ydata()), "redrawing with a shorter log did not change the plot"
plt.close("all")
print("real models self-check passed")
