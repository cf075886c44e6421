# Self-checks of tutorial/01_gating.py. tests/test_notebooks.py runs this file as one extra cell
# after the notebook's last cell, in the same kernel: the notebook's names (route, draw, controls,
# shown, load_ratio, ...) are defined here. Its last act is to print "self-check passed".
import numpy as np
import matplotlib.pyplot as plt

plt.close("all")


def _differs(a, b):
    return not (a["assignment"].shape == b["assignment"].shape
                and np.array_equal(a["assignment"], b["assignment"])
                and np.array_equal(a["tokens_per_expert"], b["tokens_per_expert"]))


# route(...) reacts to every control.
_base = route(router="softmax_top_k", top_k=2, capacity_factor=0.0, num_experts=8)
for _what, _settings in {
    "top_k": dict(top_k=1), "capacity_factor": dict(capacity_factor=0.5),
    "num_experts": dict(num_experts=4), "router": dict(router="expert_choice"),
}.items():
    assert _differs(route(**_settings), _base), f"changing {_what} did not change the routing"
assert _base["dropped"] == 0, "dropless routing dropped tokens"
assert route(capacity_factor=0.5)["dropped"] > 0, "a small capacity must drop tokens"
assert _differs(route(router="noisy_top_k", noise=0.0), route(router="noisy_top_k", noise=2.0)), "noise did nothing"
assert _differs(route(router="switch", jitter=0.0), route(router="switch", jitter=0.9)), "jitter did nothing"

# draw(...) plots what route(...) returned: the heatmap has a colour bar, expert ticks are whole
# numbers, and the two losses sit on two separate axes.
_data = route(router="softmax_top_k", capacity_factor=1.0)
_fig = draw(_data)
_heat = _fig.axes[0]
assert np.array_equal(_heat.images[0].get_array(), _data["assignment"]), "the heatmap is not the routing"
assert any(ax.get_ylabel() == "combine weight" for ax in _fig.axes), "the heatmap has no colour bar"
_fig.canvas.draw()
for _ax in _fig.axes[:2]:
    _ticks = [t for t in _ax.get_xticks() if _ax.get_xlim()[0] <= t <= _ax.get_xlim()[1]]
    assert all(float(t).is_integer() for t in _ticks), f"expert ticks are not whole numbers: {_ticks}"
_loss_axes = [ax for ax in _fig.axes if ax.get_title().startswith(("balance loss", "z-loss"))]
assert len(_loss_axes) == 2, [ax.get_title() for ax in _fig.axes]
_widths = [ax.patches[0].get_width() for ax in _loss_axes]
assert np.allclose(_widths, [_data["balance_loss"], _data["z_loss"]], rtol=1e-5), _widths
plt.close(_fig)
# The load panel leaves room above its bars and lines for the one-row legend (expert choice: every bar
# reaches the balanced line).
for _settings in (dict(router="expert_choice", capacity_factor=1.0), dict(router="switch", capacity_factor=1.0)):
    _data = route(**_settings)
    _fig = draw(_data)
    _bars_ax = _fig.axes[2 if _fig.axes[1].get_label() == "<colorbar>" else 1]
    assert _bars_ax.get_title().startswith("tokens per expert"), _bars_ax.get_title()
    _top = max((_data["tokens_per_expert"] + _data["dropped_per_expert"]).max(), _data["balanced_load"],
               _data["capacity"] or 0)
    assert _bars_ax.get_ylim()[1] >= 1.3 * _top, (_bars_ax.get_ylim(), _top)
    plt.close(_fig)

# The widgets: every control changes what is on screen, and no control is left unbound.
assert set(controls) == {"router", "top_k", "capacity_factor", "noise", "jitter", "num_experts"}
_before = shown["data"]
controls["num_experts"].value = 5
assert shown["data"] is not _before and shown["data"]["assignment"].shape == (NUM_TOKENS, 5)
controls["capacity_factor"].value = 0.5
assert shown["data"]["dropped"] > 0 and shown["data"]["capacity"] is not None
# A router that fixes k moves the top_k slider to that k and greys it out; another router frees it.
controls["router"].value = "switch"
assert shown["data"]["router"] == "switch" and shown["data"]["top_k"] == 1
assert controls["top_k"].value == 1 and controls["top_k"].disabled
controls["router"].value = "gshard"
assert shown["data"]["router"] == "gshard" and controls["top_k"].value == 2 and controls["top_k"].disabled
controls["router"].value = "softmax_top_k"
assert not controls["top_k"].disabled
controls["top_k"].value = 1
assert shown["data"]["router"] == "softmax_top_k" and shown["data"]["top_k"] == 1
# Leaving a router that forced k gives the student's own k back.
controls["top_k"].value = 3
controls["router"].value = "switch"
assert controls["top_k"].value == 1 and shown["data"]["top_k"] == 1
controls["router"].value = "softmax_top_k"
assert controls["top_k"].value == 3 and shown["data"]["top_k"] == 3 and not controls["top_k"].disabled
controls["top_k"].value = 1
# Each control, moved alone, redraws with the new value (the stale-router bug: every change counts).
controls["router"].value = "expert_choice"
assert shown["data"]["router"] == "expert_choice"
controls["router"].value = "noisy_top_k"
_quiet = shown["data"]
controls["noise"].value = 2.0
assert shown["data"]["router"] == "noisy_top_k" and _differs(shown["data"], _quiet), "noise slider did nothing"
controls["router"].value = "switch"
_still = shown["data"]
controls["jitter"].value = 0.9
assert shown["data"]["router"] == "switch" and _differs(shown["data"], _still), "jitter slider did nothing"
for _name, _value in dict(router="softmax_top_k", top_k=2, capacity_factor=0.0, noise=0.0, jitter=0.0,
                          num_experts=8).items():
    controls[_name].value = _value
assert shown["data"]["router"] == "softmax_top_k" and shown["data"]["top_k"] == 2

# Sections 4 and 5: what the text claims.
assert np.mean(load_ratio[-last:]) < load_ratio[0], "the bias did not improve the balance"
assert result["train_loss"][-1] < result["train_loss"][0], "the short training run did not lower the loss"
assert np.allclose(usage.sum(dim=2).numpy(), 1.0, atol=1e-5) and usage.max() <= 1 / spec_config.top_k + 1e-6
plt.close("all")
print("gating self-check passed")
