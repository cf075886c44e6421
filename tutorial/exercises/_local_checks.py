"""The single-process checks, one function per exercise file: ``check_<name>(module)`` raises a Hint or returns.

Each compares the student's functions with fastmoe_edu's reference (or, for the hand-written backwards,
with autograd through the reference) on small float64 inputs, including the edge cases: an expert no
token chose, every assignment dropped. The multi-rank exercises (8-10) have their single-process helpers
checked here; their exchanges run under mpirun (_rank_checks.py).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from fastmoe_edu import dispatch
from fastmoe_edu.backends import get_backend
from fastmoe_edu.distributed import pipeline as reference_pipeline
from fastmoe_edu.experts import Experts
from fastmoe_edu.routers import switch_balance_loss
from fastmoe_edu.routing import softmax_top_k_route

from ._harness import Hint, all_close, call, close, expect_pair, expect_tensor, first_bad_row

DTYPE = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_ids(num_tokens: int, top_k: int, num_experts: int, seed: int, avoid: int | None = None) -> torch.Tensor:
    """[T, k] distinct experts per token (a top-k never repeats one), never ``avoid`` (an expert nobody picks)."""
    g = _generator(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if avoid is not None:
        scores[:, avoid] = -1.0
    return scores.topk(top_k, dim=-1).indices


def _routed(num_tokens: int, top_k: int, num_experts: int, capacity: int | None, seed: int):
    """expert_ids after capacity (reference), and the reference rows / counts of the dispatch."""
    ids = dispatch.prune_capacity(_random_ids(num_tokens, top_k, num_experts, seed, avoid=num_experts - 1),
                                  num_experts, capacity)
    counts = dispatch.count_tokens_per_expert(ids, num_experts)
    rows = dispatch.stable_positions(ids, dispatch.exclusive_prefix_sum(counts))
    return ids, counts, rows


# ----------------------------------------------------------------------------------------------------
# 1. routing
# ----------------------------------------------------------------------------------------------------
def check_routing(mod) -> None:
    cases = [("8 tokens, 6 experts, k = 2", 8, 6, 2), ("5 tokens, 4 experts, k = 1", 5, 4, 1),
             ("4 tokens, 3 experts, k = E = 3", 4, 3, 3)]
    for number, (label, num_tokens, num_experts, top_k) in enumerate(cases):
        logits = torch.randn(num_tokens, num_experts, generator=_generator(10 + number), dtype=DTYPE) * 2
        ids, weights = expect_pair("softmax_top_k", call(mod, "softmax_top_k", logits.clone(), top_k))
        expect_tensor(f"{label}: expert_ids", ids, (num_tokens, top_k), "[T, k]", integer=True)
        expect_tensor(f"{label}: weights", weights, (num_tokens, top_k), "[T, k]")
        ref_ids, ref_weights = softmax_top_k_route(logits, top_k, True)
        probs = torch.softmax(logits, dim=-1)
        for t in range(num_tokens):
            chosen, wanted = ids[t].tolist(), set(ref_ids[t].tolist())
            for s, expert in enumerate(chosen):
                if expert not in wanted:
                    raise Hint(f"{label}: token {t}, slot {s}: expert {expert} is not among the token's {top_k} "
                               f"most probable experts")
            if chosen != ref_ids[t].tolist():
                raise Hint(f"{label}: token {t}: the right experts, but the slots are not in order of decreasing "
                           f"probability (slot 0 = the most probable expert)")
        sums = weights.sum(dim=-1)
        bad = (~close(sums, torch.ones_like(sums), 1e-6)).nonzero()
        if bad.numel():
            t = int(bad[0])
            raw = all_close(weights, probs.gather(1, ref_ids))
            raise Hint(f"{label}: token {t}'s {top_k} weights sum to {float(sums[t]):.4f}, not 1"
                       + (": they are the raw probabilities p[ids]; normalize them over the k chosen experts"
                          if raw else ": the weights are the chosen probabilities, normalized over the k slots"))
        t = first_bad_row(weights, ref_weights)
        if t is not None:
            raise Hint(f"{label}: token {t}: the weights sum to 1 but their values are off: w[t, s] is p[t, ids[t, s]] "
                       f"divided by the sum over the token's k chosen p, p the softmax over all E experts")

    # the hand-written backward, against autograd through the reference
    for number, (label, num_tokens, num_experts, top_k) in enumerate(cases):
        logits = (torch.randn(num_tokens, num_experts, generator=_generator(20 + number), dtype=DTYPE) * 2)
        logits.requires_grad_(True)
        ref_ids, ref_weights = softmax_top_k_route(logits, top_k, True)
        grad_weights = torch.randn(num_tokens, top_k, generator=_generator(30 + number), dtype=DTYPE)
        (ref_weights * grad_weights).sum().backward()
        got = call(mod, "softmax_top_k_backward", ref_ids.clone(), ref_weights.detach().clone(),
                   grad_weights.clone(), num_experts)
        expect_tensor(f"{label}: softmax_top_k_backward's result", got, (num_tokens, num_experts), "[T, E]")
        chosen = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, ref_ids, True)
        leaks = ((got.detach().abs() > 1e-12) & ~chosen).nonzero()
        if leaks.numel():
            t, e = leaks[0].tolist()
            raise Hint(f"{label}: token {t}: your gradient reaches expert {e}, which the token did not choose; the "
                       f"renormalized weights do not depend on the logits of the other experts (the Σ_j exp(l_j) of "
                       f"the softmax cancels)")
        wrong = (~close(got, logits.grad)).nonzero()
        if wrong.numel():
            t, e = wrong[0].tolist()
            s = ref_ids[t].tolist().index(e)
            naive = ref_weights.detach() * grad_weights
            if all_close(got.gather(1, ref_ids), naive):
                raise Hint(f"{label}: token {t}, slot {s}: you wrote ∂L/∂l = w·g, leaving out the Σ_s' w_s' g_s' "
                           f"term: every weight depends on every chosen logit through the normalizer")
            raise Hint(f"{label}: token {t}, slot {s} (expert {e}): ∂L/∂logit is off; the weights are a softmax over "
                       f"the k chosen logits: ∂w_s/∂l_ids[s'] = w_s (δ_ss' − w_s')")


# ----------------------------------------------------------------------------------------------------
# 2. capacity
# ----------------------------------------------------------------------------------------------------
def _token_major_prune(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """The usual mistake, to recognise it: the walk in token-major order t·k + s."""
    kept, used = expert_ids.clone(), [0] * num_experts
    for t in range(expert_ids.shape[0]):
        for s in range(expert_ids.shape[1]):
            e = int(expert_ids[t, s])
            if e >= 0:
                if used[e] < capacity:
                    used[e] += 1
                else:
                    kept[t, s] = -1
    return kept


def check_capacity(mod) -> None:
    base = _random_ids(10, 2, 4, seed=1, avoid=3)
    with_dropped = base.clone()
    with_dropped[[1, 4, 6], [0, 1, 0]] = -1
    cases = [("10 tokens, k = 2, E = 4, C = 3 (expert 3 chosen by nobody)", base, 4, 3),
             ("the same with some assignments already -1, C = 2", with_dropped, 4, 2),
             ("C = 0: every assignment dropped", base, 4, 0),
             ("C = 20: nothing dropped", base, 4, 20),
             ("12 tokens, k = 3, E = 5, C = 4", _random_ids(12, 3, 5, seed=2), 5, 4)]
    for label, ids, num_experts, capacity in cases:
        given = ids.clone()
        got = call(mod, "prune_capacity", given, num_experts, capacity)
        if not torch.equal(given, ids):
            raise Hint(f"{label}: you changed expert_ids in place; return a new tensor and leave the input as it was")
        expect_tensor(f"{label}: prune_capacity's result", got, tuple(ids.shape), "[T, k]", integer=True)
        want = dispatch.prune_capacity(ids, num_experts, capacity)
        if torch.equal(got, want):
            continue
        for t, s in ((t, s) for s in range(ids.shape[1]) for t in range(ids.shape[0])):
            if ids[t, s] < 0 and got[t, s] != -1:
                raise Hint(f"{label}: token {t}, slot {s} was already dropped (-1) in the input and must stay -1")
            if got[t, s] not in (-1, int(ids[t, s])):
                raise Hint(f"{label}: token {t}, slot {s}: you changed the expert id; pruning only replaces ids by -1")
        kept = dispatch.count_tokens_per_expert(got, num_experts)
        over = (kept > capacity).nonzero()
        if over.numel():
            e = int(over[0])
            raise Hint(f"{label}: expert {e} keeps {int(kept[e])} assignments, more than the capacity C = {capacity}")
        if torch.equal(got, _token_major_prune(ids, num_experts, capacity)):
            raise Hint(f"{label}: you walked the assignments token-major (t·k + s); capacity is claimed slot-major: "
                       f"every token's slot 0 first, in token order, then every token's slot 1, and so on")
        for t, s in ((t, s) for s in range(ids.shape[1]) for t in range(ids.shape[0])):   # slot-major order
            if got[t, s] != want[t, s]:
                e = int(ids[t, s])
                raise Hint(f"{label}: token {t}, slot {s} (expert {e}) is wrongly {'kept' if got[t, s] >= 0 else 'dropped'}: "
                           f"count how many of expert {e}'s assignments come before it in slot-major order (C = {capacity})")


# ----------------------------------------------------------------------------------------------------
# 3. counting and ranking
# ----------------------------------------------------------------------------------------------------
def check_positions(mod) -> None:
    routed = dispatch.prune_capacity(_random_ids(9, 2, 5, seed=3, avoid=4), 5, 3)
    cases = [("9 tokens, k = 2, E = 5, capacity 3 (expert 4 chosen by nobody)", routed, 5),
             ("every assignment dropped", torch.full((4, 2), -1, dtype=torch.int64), 3),
             ("6 tokens, k = 3, E = 4, dropless", _random_ids(6, 3, 4, seed=4), 4)]
    for label, ids, num_experts in cases:
        counts = call(mod, "count_tokens_per_expert", ids.clone(), num_experts)
        if isinstance(counts, torch.Tensor) and counts.dim() == 1 and counts.shape[0] != num_experts:
            raise Hint(f"{label}: counts has {counts.shape[0]} entries; it needs one per expert (E = {num_experts}), "
                       f"0 for the experts nobody chose")
        expect_tensor(f"{label}: counts", counts, (num_experts,), "[E]", integer=True)
        want_counts = dispatch.count_tokens_per_expert(ids, num_experts)
        if not torch.equal(counts, want_counts):
            if int(counts.sum()) == ids.numel() and int((ids < 0).sum()):
                raise Hint(f"{label}: your counts add up to all T·k = {ids.numel()} assignments: the dropped ones "
                           f"(-1) must not be counted")
            e = int((counts != want_counts).nonzero()[0])
            raise Hint(f"{label}: count[{e}] is off: the number of (token, slot) pairs routed to expert {e}")

        starts = call(mod, "exclusive_prefix_sum", want_counts.clone())
        expect_tensor(f"{label}: starts", starts, (num_experts,), "[E]", integer=True)
        want_starts = dispatch.exclusive_prefix_sum(want_counts)
        if not torch.equal(starts, want_starts):
            if torch.equal(starts, torch.cumsum(want_counts, 0)):
                raise Hint(f"{label}: that is the inclusive prefix sum; the segment of expert e starts at "
                           f"Σ_(j<e) count[j], so start[0] = 0")
            e = int((starts != want_starts).nonzero()[0])
            raise Hint(f"{label}: start[{e}] is off: where expert {e}'s segment begins = Σ_(j<{e}) count[j]")

        rows = call(mod, "stable_positions", ids.clone(), want_starts.clone())
        expect_tensor(f"{label}: rows", rows, tuple(ids.shape), "[T, k]", integer=True)
        want_rows = dispatch.stable_positions(ids, want_starts)
        if torch.equal(rows, want_rows):
            continue
        ends = want_starts + want_counts
        for t, s in ((t, s) for t in range(ids.shape[0]) for s in range(ids.shape[1])):
            e, r = int(ids[t, s]), int(rows[t, s])
            if e < 0 and r != -1:
                raise Hint(f"{label}: token {t}, slot {s} is dropped (-1) and must get row -1, not {r}")
            if e >= 0 and not int(want_starts[e]) <= r < int(ends[e]):
                raise Hint(f"{label}: token {t}, slot {s} (expert {e}): row {r} lies outside expert {e}'s segment "
                           f"[{int(want_starts[e])}, {int(ends[e])})")
        kept = rows[ids >= 0]
        if kept.unique().numel() != kept.numel():
            r = int(next(v for v in kept.unique() if int((kept == v).sum()) > 1))
            raise Hint(f"{label}: row {r} is given to two (token, slot) pairs; every kept pair needs its own row")
        t, s = next((t, s) for t in range(ids.shape[0]) for s in range(ids.shape[1]) if rows[t, s] != want_rows[t, s])
        raise Hint(f"{label}: token {t}, slot {s} (expert {int(ids[t, s])}) got the wrong row inside its segment: "
                   f"a segment keeps the flattened order t·k + s (stable), so earlier tokens get earlier rows")


# ----------------------------------------------------------------------------------------------------
# 4. scatter
# ----------------------------------------------------------------------------------------------------
def check_scatter(mod) -> None:
    for label, num_tokens, top_k, num_experts, capacity, seed in (
            ("10 tokens, k = 2, E = 4, capacity 3", 10, 2, 4, 3, 5),
            ("7 tokens, k = 3, E = 5, dropless", 7, 3, 5, None, 6),
            ("every assignment dropped", 5, 2, 4, 0, 7)):
        ids, counts, rows = _routed(num_tokens, top_k, num_experts, capacity, seed)
        num_rows = int(counts.sum())
        x = torch.randn(num_tokens, 3, generator=_generator(seed), dtype=DTYPE).requires_grad_(True)
        buffer = call(mod, "scatter_rows", x, rows.clone(), num_rows)
        expect_tensor(f"{label}: the buffer", buffer, (num_rows, 3), "[N, d] (N = kept assignments)")
        want = dispatch.scatter_rows(x.detach(), rows, num_rows)
        bad = first_bad_row(buffer, want)
        if bad is not None:
            t, s = ((rows == bad).nonzero()[0]).tolist()
            holds = [u for u in range(num_tokens) if all_close(buffer[bad], x.detach()[u])]
            what = (f"token {holds[0]}'s row" if holds else "zeros" if not buffer[bad].detach().abs().sum()
                    else "no token's row")
            raise Hint(f"{label}: buffer row {bad} belongs to token {t}, slot {s} (rows[{t}, {s}] = {bad}) but holds "
                       f"{what}: every kept (t, s) copies x[t] to buffer[rows[t, s]]")
        if num_rows == 0:
            continue
        grad_buffer = torch.randn(num_rows, 3, generator=_generator(seed + 100), dtype=DTYPE)
        if not buffer.requires_grad:
            raise Hint(f"{label}: the buffer is not connected to x for autograd (it does not require grad): build it "
                       f"from x with differentiable operations, not from x.detach() / x.data or a Python loop of .item()")
        (grad,) = torch.autograd.grad(buffer, x, grad_buffer, allow_unused=True)
        want_grad = torch.zeros_like(x).index_add(0, torch.arange(num_tokens).repeat_interleave(top_k)[rows.reshape(-1) >= 0],
                                                  grad_buffer[rows.reshape(-1)[rows.reshape(-1) >= 0]])
        t = first_bad_row(grad if grad is not None else torch.zeros_like(x), want_grad)
        if t is not None:
            raise Hint(f"{label}: the gradient of token {t} is off: grad_x[t] must collect the gradients of all of "
                       f"its kept copies (it has {int((rows[t] >= 0).sum())})")


# ----------------------------------------------------------------------------------------------------
# 5. the grouped expert FFN
# ----------------------------------------------------------------------------------------------------
def check_experts(mod) -> None:
    g = _generator(8)
    num_experts, d_in, d_out = 4, 3, 5
    weight = torch.randn(num_experts, d_out, d_in, generator=g, dtype=DTYPE)
    for label, counts in (("segments of 3, 0, 2, 1 rows (expert 1 has none)", [3, 0, 2, 1]),
                          ("no rows at all", [0, 0, 0, 0])):
        counts = torch.tensor(counts)
        rows = torch.randn(int(counts.sum()), d_in, generator=g, dtype=DTYPE)
        out = call(mod, "grouped_matmul", rows.clone(), weight.clone(), counts.clone())
        expect_tensor(f"grouped_matmul, {label}", out, (rows.shape[0], d_out), "[N, d_out]")
        want = dispatch.grouped_matmul(rows, weight, counts)
        bad = first_bad_row(out, want)
        if bad is not None:
            e = int(torch.searchsorted(torch.cumsum(counts, 0), torch.tensor(bad), right=True))
            start = int(counts[:e].sum())
            segment = slice(start, start + int(counts[e]))
            used = [j for j in range(num_experts) if all_close(out[segment], rows[segment] @ weight[j].t())]
            raise Hint(f"grouped_matmul, {label}: the segment of expert {e} (rows {segment.start}..{segment.stop - 1}) "
                       + (f"was multiplied by expert {used[0]}'s weight: segment e goes with weight[e]" if used
                          else "is off: out = rows · W_eᵀ on that segment"))

    d_model, d_hidden = 4, 6
    experts = Experts(num_experts, d_model, d_hidden, "swiglu").double()
    for label, counts in (("segments of 2, 3, 0, 1 rows", [2, 3, 0, 1]), ("no rows at all", [0, 0, 0, 0])):
        counts = torch.tensor(counts)
        rows = torch.randn(int(counts.sum()), d_model, generator=g, dtype=DTYPE)
        params = [p.detach().clone().requires_grad_(True) for p in (experts.w1, experts.w2, experts.w3)]
        mine = rows.clone().requires_grad_(True)
        out = call(mod, "swiglu_experts", mine, counts.clone(), *params)
        expect_tensor(f"swiglu_experts, {label}", out, (rows.shape[0], d_model), "[N, d_model]")
        reference = rows.clone().requires_grad_(True)
        want = experts(reference, counts, get_backend("reference"))
        if not all_close(out, want):
            w1, w2, w3 = (p.detach() for p in params)
            swapped = dispatch.grouped_matmul(F.silu(dispatch.grouped_matmul(rows, w3, counts))
                                              * dispatch.grouped_matmul(rows, w1, counts), w2, counts)
            plain = dispatch.grouped_matmul(dispatch.grouped_matmul(rows, w1, counts)
                                            * dispatch.grouped_matmul(rows, w3, counts), w2, counts)
            if all_close(out, swapped):
                raise Hint(f"swiglu_experts, {label}: silu is applied to W3·x; it belongs to the gate W1·x")
            if all_close(out, plain):
                raise Hint(f"swiglu_experts, {label}: the silu is missing: silu(W1·x) ⊙ (W3·x)")
            raise Hint(f"swiglu_experts, {label}: row {first_bad_row(out, want)} is off: "
                       f"expert_e(x) = W2_e · (silu(W1_e·x) ⊙ (W3_e·x)) on each segment")
        if rows.shape[0] == 0:
            continue
        grad_out = torch.randn_like(want)
        if not out.requires_grad:
            raise Hint(f"swiglu_experts, {label}: the output is not connected to rows and weights for autograd: keep "
                       f"every step differentiable (no .detach(), .data, .item())")
        got = torch.autograd.grad(out, [mine, *params], grad_out, allow_unused=True)
        wanted = torch.autograd.grad(want, [reference, experts.w1, experts.w2, experts.w3], grad_out)
        for name, a, b in zip(("rows", "w1", "w2", "w3"), got, wanted):
            if a is None or not all_close(a, b):
                raise Hint(f"swiglu_experts, {label}: the forward is right but the gradient of {name} is "
                           f"{'missing' if a is None else 'off'}: did something get detached or written in place?")


# ----------------------------------------------------------------------------------------------------
# 6. combine and its backward
# ----------------------------------------------------------------------------------------------------
def check_combine(mod) -> None:
    for label, num_tokens, top_k, num_experts, capacity, seed in (
            ("10 tokens, k = 2, E = 4, capacity 3 (some slots dropped)", 10, 2, 4, 3, 9),
            ("6 tokens, k = 3, E = 4, capacity 2 (tokens with no kept slot)", 6, 3, 4, 2, 10),
            ("every assignment dropped", 4, 2, 3, 0, 11)):
        ids, counts, rows = _routed(num_tokens, top_k, num_experts, capacity, seed)
        g = _generator(seed)
        expert_out = torch.randn(int(counts.sum()), 3, generator=g, dtype=DTYPE)
        weights = torch.rand(num_tokens, top_k, generator=g, dtype=DTYPE)
        y = call(mod, "gather_combine", expert_out.clone(), rows.clone(), weights.clone())
        expect_tensor(f"{label}: y", y, (num_tokens, 3), "[T, d]")
        want = dispatch.gather_combine(expert_out, rows, weights)
        t = first_bad_row(y, want)
        if t is not None:
            dropped = [s for s in range(top_k) if rows[t, s] < 0]
            if dropped and expert_out.shape[0]:
                wrapped = want[t] + sum(weights[t, s] * expert_out[-1] for s in dropped)
                if all_close(y[t], wrapped):
                    raise Hint(f"{label}: token {t}'s slot {dropped[0]} is dropped (row −1), but your y[{t}] includes "
                               f"it: in Python, index −1 is the last row; a dropped slot must add nothing")
            raise Hint(f"{label}: y[{t}] is off: y[t] = Σ over the kept slots s of weights[t, s] · "
                       f"expert_out[rows[t, s]]" + (" (token {t} has no kept slot: y[t] = 0)".format(t=t)
                                                     if not (rows[t] >= 0).any() else ""))

        grad_y = torch.randn(num_tokens, 3, generator=g, dtype=DTYPE)
        result = call(mod, "gather_combine_backward", expert_out.clone(), rows.clone(), weights.clone(), grad_y.clone())
        grad_out, grad_weights = expect_pair("gather_combine_backward", result)
        expect_tensor(f"{label}: grad_expert_out", grad_out, tuple(expert_out.shape), "[N, d]")
        expect_tensor(f"{label}: grad_weights", grad_weights, (num_tokens, top_k), "[T, k]")
        out_leaf, weights_leaf = expert_out.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        want_out, want_weights = torch.autograd.grad((dispatch.gather_combine(out_leaf, rows, weights_leaf) * grad_y).sum(),
                                                     [out_leaf, weights_leaf], allow_unused=True)
        want_out = torch.zeros_like(expert_out) if want_out is None else want_out
        r = first_bad_row(grad_out, want_out)
        if r is not None:
            t, s = (rows == r).nonzero()[0].tolist()
            raise Hint(f"{label}: grad_expert_out[{r}] is off; row {r} is read by token {t}, slot {s}: "
                       f"∂L/∂expert_out[rows[t, s]] = weights[t, s] · grad_y[t]")
        wrong = (~close(grad_weights, want_weights)).nonzero()
        if wrong.numel():
            t, s = wrong[0].tolist()
            if rows[t, s] < 0:
                raise Hint(f"{label}: grad_weights[{t}, {s}] must be 0: slot {s} of token {t} is dropped, its weight "
                           f"touches nothing")
            raise Hint(f"{label}: grad_weights[{t}, {s}] is off: ∂L/∂weights[t, s] = <grad_y[t], expert_out[rows[t, s]]>")


# ----------------------------------------------------------------------------------------------------
# 7. balance loss
# ----------------------------------------------------------------------------------------------------
def check_balance(mod) -> None:
    num_tokens, num_experts, top_k = 12, 4, 2
    logits = torch.randn(num_tokens, num_experts, generator=_generator(12), dtype=DTYPE)
    routed = dispatch.prune_capacity(_random_ids(num_tokens, top_k, num_experts, seed=13), num_experts, 5)
    balanced_ids = torch.stack([torch.arange(num_tokens) % num_experts, (torch.arange(num_tokens) + 1) % num_experts], 1)
    cases = [("12 tokens, k = 2, E = 4, capacity 5 (some dropped)", logits, routed),
             ("a perfectly balanced load with uniform probabilities", torch.zeros(num_tokens, num_experts, dtype=DTYPE),
              balanced_ids),
             ("every assignment dropped", logits, torch.full((num_tokens, top_k), -1, dtype=torch.int64))]
    for label, case_logits, ids in cases:
        probs = torch.softmax(case_logits, dim=-1).requires_grad_(True)
        loss = call(mod, "balance_loss", probs, ids.clone())
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise Hint(f"{label}: balance_loss should return a scalar tensor, got "
                       f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
        reference_probs = probs.detach().clone().requires_grad_(True)
        want = switch_balance_loss(reference_probs, ids)
        value, wanted = float(loss.detach()), float(want.detach())
        if value != value:                                                 # nan
            raise Hint(f"{label}: your loss is nan: when no assignment is kept, f = 0 and the loss is 0 "
                       f"(guard the division by the number of kept assignments)")
        if abs(value - wanted) > 1e-9 * (1 + abs(wanted)):
            kept = int((ids >= 0).sum())
            if wanted and abs(value - wanted * kept / num_tokens) < 1e-9 * (1 + abs(value)):
                raise Hint(f"{label}: your f sums to {kept / num_tokens:g}, not 1: f_e is the fraction of the kept "
                           f"(token, slot) assignments, divided by their number, not by T")
            if wanted and abs(value - wanted * num_tokens) < 1e-9 * (1 + abs(value)):
                raise Hint(f"{label}: your loss is T = {num_tokens} times too large: P_e is the mean of probs[:, e] "
                           f"over the tokens, not the sum")
            if wanted and kept < ids.numel() and abs(value - wanted * kept / ids.numel()) < 1e-9 * (1 + abs(value)):
                raise Hint(f"{label}: f divides by all T·k assignments; the dropped ones (-1) count nowhere")
            raise Hint(f"{label}: the loss is {value:.6g}, which is off"
                       + (" (a perfectly balanced load gives exactly 1)" if "balanced" in label else
                          ": loss = E · Σ_e f_e · P_e"))
        if not kept_any(ids):
            continue
        want.backward()
        if not loss.requires_grad:
            raise Hint(f"{label}: the loss does not depend on probs for autograd: P_e must be computed from probs "
                       f"with differentiable operations")
        (grad,) = torch.autograd.grad(loss, probs, allow_unused=True)
        if grad is None or not all_close(grad, reference_probs.grad):
            raise Hint(f"{label}: the loss is right but its gradient wrt probs is off: f_e is a count (no gradient); "
                       f"only P_e carries it")


def kept_any(ids: torch.Tensor) -> bool:
    return bool((ids >= 0).any())


# ----------------------------------------------------------------------------------------------------
# 8-10: the single-process helpers of the multi-rank exercises
# ----------------------------------------------------------------------------------------------------
def _labelled_blocks(block_counts: torch.Tensor) -> torch.Tensor:
    """Rows whose values say where they come from: (i, j, position) for block (i, j) of an i-major layout."""
    rows = [torch.tensor([[i, j, n]], dtype=DTYPE) for i in range(block_counts.shape[0])
            for j in range(block_counts.shape[1]) for n in range(int(block_counts[i, j]))]
    return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=DTYPE)


def check_expert_parallel(mod) -> None:
    for label, recv_counts in (("2 ranks, 3 local experts", torch.tensor([[2, 0, 1], [1, 3, 0]])),
                               ("4 ranks, 2 local experts, nothing from rank 2", torch.tensor([[1, 2], [2, 0], [0, 0], [1, 1]])),
                               ("nothing received", torch.zeros(2, 2, dtype=torch.int64))):
        received = _labelled_blocks(recv_counts)                              # (source, expert, n), source-major
        got = call(mod, "regroup_by_expert", received.clone(), recv_counts.clone())
        expect_tensor(f"regroup_by_expert, {label}", got, tuple(received.shape), "[Σ recv_counts, d]")
        want = _labelled_blocks(recv_counts.t())[:, [1, 0, 2]]                # expert-major, labelled (s, e, n)
        bad = first_bad_row(got, want)
        if bad is not None:
            s, e, _ = want[bad].long().tolist()
            raise Hint(f"regroup_by_expert, {label}: output row {bad} should belong to local expert {e} from source "
                       f"rank {s}: expert-major means all of local expert 0's rows (sources in rank order, each "
                       f"block's rows in order), then local expert 1's, ...")
        back = call(mod, "regroup_by_source", want.clone(), recv_counts.clone())
        expect_tensor(f"regroup_by_source, {label}", back, tuple(received.shape), "[Σ recv_counts, d]")
        bad = first_bad_row(back, received)
        if bad is not None:
            raise Hint(f"regroup_by_source, {label}: row {bad} is not where it came from: regroup_by_source must undo "
                       f"regroup_by_expert (blocks (expert, source) back to (source, expert) order)")


def check_ted(mod) -> None:
    for num_tokens, tp_size in ((9, 2), (8, 2), (1, 2), (10, 4), (3, 4)):
        shares = []
        for rank in range(tp_size):
            share = expect_pair("token_share", call(mod, "token_share", num_tokens, tp_size, rank))
            shares.append(tuple(int(v) for v in share))
        label = f"token_share with T = {num_tokens}, tp = {tp_size}"
        position = 0
        for rank, (start, stop) in enumerate(shares):
            if start != position:
                raise Hint(f"{label}: rank {rank}'s share starts at {start}, but the shares before it end at "
                           f"{position}: the shares must be consecutive, in rank order, without gap or overlap")
            if stop < start:
                raise Hint(f"{label}: rank {rank}'s share ({start}, {stop}) ends before it starts")
            position = stop
        if position != num_tokens:
            raise Hint(f"{label}: the shares cover {position} tokens, not all {num_tokens}")
        sizes = [stop - start for start, stop in shares]
        if max(sizes) - min(sizes) > 1 or sizes != sorted(sizes, reverse=True):
            raise Hint(f"{label}: share sizes {sizes}: as equal as possible, and the first T mod tp ranks get the "
                       f"extra token")


def check_pipeline(mod) -> None:
    for label, counts, degree in (("segments of 5, 0, 1, 4 rows, 2 chunks", [5, 0, 1, 4], 2),
                                  ("segments of 7, 2, 3 rows, 3 chunks", [7, 2, 3], 3),
                                  ("no rows at all, 2 chunks", [0, 0], 2)):
        counts = torch.tensor(counts)
        result = call(mod, "chunk_rows", counts.clone(), degree)
        indices, chunk_counts = expect_pair("chunk_rows", result)
        want_indices, want_counts = reference_pipeline.chunk_rows(counts, degree)
        expect_tensor(f"chunk_rows, {label}: chunk_counts", chunk_counts, tuple(want_counts.shape),
                      "[D, segments]", integer=True)
        if len(indices) != degree:
            raise Hint(f"chunk_rows, {label}: {len(indices)} index tensors; one per chunk (D = {degree})")
        for c in range(degree):
            for i in range(counts.numel()):
                if int(chunk_counts[c, i]) != int(want_counts[c, i]):
                    raise Hint(f"chunk_rows, {label}: chunk {c} takes {int(chunk_counts[c, i])} of segment {i}'s "
                               f"{int(counts[i])} rows: piece c of n rows is rows ⌊c·n/D⌋ .. ⌊(c+1)·n/D⌋ − 1")
            if not torch.equal(torch.as_tensor(indices[c]).long(), want_indices[c]):
                raise Hint(f"chunk_rows, {label}: chunk {c}'s buffer rows are off: piece c of every segment, "
                           f"in buffer order (segment i starts at Σ_(j<i) counts[j])")
