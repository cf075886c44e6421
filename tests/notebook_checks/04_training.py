# Self-checks of tutorial/04_training.py. tests/test_notebooks.py runs this file as one extra cell
# after the notebook's last cell, in the same kernel: the notebook's names (history, ref_loss,
# nb_loss, difference, in_steps, ...) are defined here. Its last act is to print "self-check passed".
import numpy as np
import matplotlib.pyplot as plt

# Training: every step recorded, the loss went down, two MoE layers' loads per step.
assert len(history["train"]) == STEPS and all(len(r["tokens_per_expert"]) == 2 for r in history["train"])
assert history["train"][-1]["lm_loss"] < history["train"][0]["lm_loss"], "the loss did not go down"
assert reference_run["steps"] == STEPS and not reference_run["interrupted"]

# The backend comparison: same number of steps; identical routing means rounding-level differences.
assert len(ref_loss) == len(nb_loss) == STEPS
assert before_flip.max() < 1e-4, f"the backends' losses differ by {before_flip.max():.3g} with identical routing"
assert difference.max() < 0.1, f"the backends' loss curves drifted apart by {difference.max():.3g}"
_tail = max(1, STEPS // 10)
assert abs(ref_loss[-_tail:].mean() - nb_loss[-_tail:].mean()) < 0.05, "the backends end at different losses"

# The difference plot shows what the text says: |difference| in float32 rounding steps, whole
# numbers of steps (each loss is a float32 value), and a running maximum that never decreases.
assert np.allclose(in_steps * rounding_step, difference)
_same_binade = np.frexp(ref_loss.astype(np.float32))[1] == np.frexp(nb_loss.astype(np.float32))[1]
assert np.allclose(in_steps[_same_binade], np.round(in_steps[_same_binade])), "not whole float32 steps"
assert np.all(np.diff(np.maximum.accumulate(in_steps)) >= 0)
assert np.array_equal(rounding_step, np.spacing(ref_loss.astype(np.float32)).astype(float))
# The specialisation heat map's colour bar says what its colours mean.
assert any(ax.get_label() == "<colorbar>" and ax.get_ylabel() for ax in usage_fig.axes), "unlabelled colour bar"
plt.close("all")
print("training self-check passed")
