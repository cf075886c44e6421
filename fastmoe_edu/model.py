"""A small GPT-style language model whose feed-forward layers are Mixtures of Experts.

    tokens ─► TokenAndPositionEmbedding ─► Block × n_layer ─► LayerNorm ─► LM head ─► logits

    Block (pre-norm, residual):   h = h + CausalSelfAttention(LayerNorm(h))
                                  h = h + FeedForward(LayerNorm(h))      FeedForward = MoELayer or DenseMLP

The only MoE-specific parts are the ``MoELayer`` feed-forwards (``fastmoe_edu/layer.py``) and the loss:

    loss = cross_entropy(logits, targets) + Σ_layers layer.aux_loss

The auxiliary (load-balancing / z) losses are already weighted by each router. Both parts are kept
on the model after a forward (``last_lm_loss``, ``last_aux_loss``) so the training loop can log
them separately: the LM loss is what we care about, the aux loss is what keeps experts busy.

Parameters come in two kinds, which matters once the model is spread over several processes:
*expert parameters* (everything under a ``MoELayer.experts``; in expert parallelism each rank holds
only its own experts) and *replicated parameters* (everything else: embeddings, attention, norms,
routers, dense MLPs; every rank holds a copy and their gradients are all-reduced).
``split_parameters()`` and ``is_expert_parameter(name)`` give that split.

    python -m fastmoe_edu.model          # build the default model and print its parameter counts
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from fastmoe_edu import MoELayer
from fastmoe_edu.options import SOFT_MOE, LayerOptions
from fastmoe_edu.precision import at_least_float32
from fastmoe_edu.soft_moe import NOT_CAUSAL as SOFT_MOE_NOT_CAUSAL


@dataclass(kw_only=True)
class ModelConfig(LayerOptions):
    """The model's shape, and (inherited) every option of its MoE layers (options.LayerOptions)."""
    vocab_size: int
    seq_len: int                       # the longest context the position embedding covers
    n_layer: int = 2
    n_head: int = 4
    moe_every: int = 1                 # block i is MoE when (i + 1) % moe_every == 0
    tie_weights: bool = True           # the LM head reuses the token embedding matrix
    activation_checkpointing: bool = False   # keep only each block's input; recompute the block in backward


def no_recompute_contexts():
    """What a block does around its forward pass and its recomputation: nothing, in one process
    (``parallelize`` installs distributed/recompute.py's, which replay the block's messages)."""
    return contextlib.nullcontext(), contextlib.nullcontext()


class TokenAndPositionEmbedding(nn.Module):
    """h[b, t] = wte[token] + wpe[t]: what the token is plus where it is (learned, GPT-2 style)."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(seq_len, d_model)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.wte(idx) + self.wpe(positions)[None]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t only sees positions <= t.

    q, k, v and the output projection are four separate linear maps so that tensor parallelism is a
    local change: split q/k/v by output columns (whole heads per rank), the output projection by
    input rows, and all-reduce its result (Megatron-LM's column-/row-parallel pair).
    """

    def __init__(self, d_model: int, n_head: int, n_layer: int):
        super().__init__()
        assert d_model % n_head == 0, f"d_model={d_model} must be divisible by n_head={n_head}"
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=0.02)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2·n_layer), so the
        # variance of the residual stream does not grow with depth.
        nn.init.normal_(self.out_proj.weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, d] -> [B, heads, T, head_dim]
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # softmax(q kᵀ / sqrt(head_dim) + causal mask) v, fused by PyTorch.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)                                # heads back side by side
        return self.out_proj(y)


class DenseMLP(nn.Module):
    """The ordinary transformer feed-forward, d -> d_hidden -> d (GELU), for blocks that are not MoE."""

    def __init__(self, d_model: int, d_hidden: int, n_layer: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden)
        self.down = nn.Linear(d_hidden, d_model)
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.normal_(self.down.weight, std=0.02 / math.sqrt(2 * n_layer))
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """One pre-norm transformer block: attention mixes tokens, the feed-forward transforms each token."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head, cfg.n_layer)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        if moe:
            # Each token is routed to top_k of num_experts feed-forward networks (see layer.py).
            self.ffn = MoELayer(options=LayerOptions.of(cfg))
        else:
            self.ffn = DenseMLP(cfg.d_model, cfg.d_hidden, cfg.n_layer)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_attn(h))
        return h + self.ffn(self.ln_ffn(h))


class MoETransformer(nn.Module):
    """GPT-style decoder-only language model with MoE feed-forward layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.router == SOFT_MOE:             # its slots mix the positions of a sequence: not causal
            raise ValueError(SOFT_MOE_NOT_CAUSAL)
        self.cfg = cfg
        self.embed = TokenAndPositionEmbedding(cfg.vocab_size, cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, moe=(i + 1) % cfg.moe_every == 0) for i in range(cfg.n_layer))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.embed.wte.weight    # one matrix reads tokens in and writes them out
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        self.last_lm_loss: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        # The seam for activation checkpointing: (context of a block's forward, context of its
        # recomputation), as torch.utils.checkpoint's context_fn.
        self.recompute_contexts = no_recompute_contexts

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx [B, T] token ids -> (logits [B, T, vocab], loss or None).

        loss = cross-entropy of the next-token predictions + the sum of the MoE layers' aux losses.
        """
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of length {idx.shape[1]} is longer than seq_len={self.cfg.seq_len}")
        h = self.embed(idx)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                # Activation checkpointing: keep h, drop the block's inner activations, run the block
                # again in the backward pass when they are needed (compute traded for memory).
                h = checkpoint(block, h, use_reentrant=False, context_fn=self.recompute_contexts)
            else:
                h = block(h)
        logits = self.lm_head(self.ln_final(h))
        if targets is None:
            return logits, None
        # The loss in float32 even when the logits come from a bfloat16/float16 matmul (precision.py).
        lm_loss = F.cross_entropy(at_least_float32(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1))
        aux_loss = sum((torch.as_tensor(layer.aux_loss, dtype=lm_loss.dtype, device=lm_loss.device)
                        for layer in self.moe_layers()), lm_loss.new_zeros(()))
        self.last_lm_loss, self.last_aux_loss = lm_loss.detach(), aux_loss.detach()
        return logits, lm_loss + aux_loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt idx [B, T]; returns [B, T + max_new_tokens]."""
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.seq_len:]                                    # crop to the context window
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature
            if top_k is not None and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_token], dim=1)
        self.train(was_training)
        return idx

    # -- MoE helpers -----------------------------------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        """The MoE feed-forward layers, in depth order."""
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

    def update_router_biases(self) -> None:
        """Call after every optimizer step: loss-free bias balancing of the sigmoid router (no-op otherwise)."""
        for layer in self.moe_layers():
            layer.update_router_bias()

    def split_parameters(self) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        """(replicated, expert) parameters by name; expert = under some ``MoELayer.experts``."""
        expert_ids = {id(p) for layer in self.moe_layers() for p in layer.experts.parameters()}
        replicated, expert = {}, {}
        for name, param in self.named_parameters():
            (expert if id(param) in expert_ids else replicated)[name] = param
        return replicated, expert

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total, replicated, expert, and active per token (only top_k experts run)."""
        n_rep, n_exp = (sum(p.numel() for p in part.values()) for part in self.split_parameters())
        active_fraction = self.cfg.top_k / self.cfg.num_experts
        return {"total": n_rep + n_exp, "replicated": n_rep, "expert": n_exp,
                "active_per_token": n_rep + round(n_exp * active_fraction)}


def is_expert_parameter(name: str) -> bool:
    """True for parameter names under a MoE layer's experts, e.g. ``blocks.0.ffn.experts.w1``.

    Everything else (the router ``...ffn.router.weight`` included) is replicated on every rank.
    """
    return ".experts." in f".{name}"


def build_model(cfg, vocab_size: int) -> MoETransformer:
    """A model from a TrainConfig (anything with the ModelConfig field names) and the dataset's vocab size."""
    names = [f for f in ModelConfig.__dataclass_fields__ if f != "vocab_size"]
    return MoETransformer(ModelConfig(vocab_size=vocab_size, **{n: getattr(cfg, n) for n in names}))


if __name__ == "__main__":
    model = MoETransformer(ModelConfig(vocab_size=64, seq_len=64))
    print(model)
    print(model.num_parameters())
    x = torch.randint(0, 64, (2, 16))
    logits, loss = model(x, x)
    print("logits", tuple(logits.shape), "loss", loss.item(), "aux", model.last_aux_loss.item())
