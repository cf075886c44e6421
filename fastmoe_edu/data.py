"""Datasets for the MoE language model. Nothing is downloaded: every token is generated or read locally.

Two datasets, picked by name through ``DATASETS`` / ``get_dataset(name)``:

``"languages"`` (default)
    A mixture of four small synthetic token "languages" over one shared 64-symbol vocabulary.
    Every sequence is written in a single language, and ``sample_batch`` also returns which one,
    so a notebook can plot which experts each language is routed to. The languages are chosen to
    be easy to learn but *different in kind*, which is the situation where a Mixture-of-Experts
    layer is expected to specialise:

        counting   arithmetic progressions            0 3 6 9 c f i ...   (deterministic after 2 tokens)
        copy       a random 8-letter word, repeated   kqztabcd kqztabcd   (needs attention: look 8 tokens back)
        markov     a random bigram chain              each symbol has 3 possible successors
        dyck       well-nested brackets               ( [ < > ] { } ) ... (a closer is forced by the stack)

    Languages are equally likely. The best achievable loss (entropy per token) is about 0.1 nats for
    counting, 0.4 for copy (the first word is random), 0.83 for markov and 1.37 for dyck (open or
    close, and which bracket), so about 0.7 for the mixture, while a model that knows nothing pays
    ln(64) ≈ 4.16 nats.

``"stdlib"``
    Character-level text: the Python standard library's own ``.py`` files, read in sorted order
    up to a size cap (default 2 MB). ASCII only (vocabulary of 128); any other character becomes
    token 0. The first 90% of the characters are the train split, the last 10% the val split. The
    corpus depends on the Python version, but it exists on every machine that can run this code.

Reproducibility: a batch is a pure function of ``(seed, split, step)``. ``batch_rng(seed, split,
step)`` builds the numpy generator for it, so a training run resumed from a checkpoint at step s
sees exactly the batches an uninterrupted run would have seen, with no data-loader state to save.

    python -m fastmoe_edu.data              # print a few samples of every language
    python -m fastmoe_edu.data stdlib       # ... or of the stdlib corpus
"""
from __future__ import annotations

import functools
import os
import sys
import sysconfig

import numpy as np
import torch

SPLITS = {"train": 0, "val": 1}


def batch_rng(seed: int, split: str, step: int) -> np.random.Generator:
    """The random generator for batch number ``step`` of ``split``: independent streams per (seed, split, step)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not known; allowed: {', '.join(SPLITS)}")
    # numpy's SeedSequence mixes the whole list, so neighbouring steps get unrelated streams.
    return np.random.default_rng([int(seed), SPLITS[split], int(step)])


# --------------------------------------------------------------------------------------------------
# "languages": four synthetic languages over one shared vocabulary
# --------------------------------------------------------------------------------------------------

# 64 printable symbols: 56 alphanumerics, then 4 bracket pairs. Token i prints as SYMBOLS[i].
ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRST"
BRACKETS = "()[]{}<>"
SYMBOLS = ALNUM + BRACKETS
LOWERCASE = [SYMBOLS.index(c) for c in "abcdefghijklmnopqrstuvwxyz"]
OPENERS = [SYMBOLS.index(c) for c in BRACKETS[0::2]]   # ( [ { <
CLOSERS = [SYMBOLS.index(c) for c in BRACKETS[1::2]]   # ) ] } >


class SyntheticLanguages:
    """Sequences drawn from a mixture of small synthetic languages; see the module docstring.

    ``language_seed`` fixes the languages themselves (the Markov chain's transition table); it is
    separate from the training seed, so two runs with different seeds learn the *same* languages.
    """

    name = "languages"
    language_names = ("counting", "copy", "markov", "dyck")
    vocab_size = len(SYMBOLS)

    # Knobs of the individual languages (small on purpose: the default model trains in a minute).
    steps = (1, 2, 3, 5)              # counting: the common difference of a progression
    # copy: length of the repeated word. One fixed period is learned in a few hundred steps (attend
    # 8 positions back); mixed periods need an "induction head" that finds the previous occurrence of
    # the current token, which a 1-minute run does not reliably learn. Try (4, 6, 8) for a harder task.
    copy_periods = (8,)
    markov_successors = 3             # markov: how many symbols may follow each symbol
    dyck_max_depth = 8                # dyck: deepest allowed nesting

    def __init__(self, language_seed: int = 0):
        rng = np.random.default_rng([int(language_seed), 12345])
        n = len(ALNUM)
        # Markov chain over the 56 alphanumerics: each symbol gets its own few successors with
        # random (Dirichlet) probabilities, stored as a dense n x n row-stochastic matrix.
        self.transition = np.zeros((n, n))
        for a in range(n):
            successors = rng.choice(n, size=self.markov_successors, replace=False)
            self.transition[a, successors] = rng.dirichlet(np.ones(self.markov_successors))
        self._cumulative = np.cumsum(self.transition, axis=1)

    # Each _gen_* returns an int64 array [rows, length] of token ids.

    def _gen_counting(self, rng, rows, length):
        start = rng.integers(0, len(ALNUM), size=(rows, 1))
        step = rng.choice(self.steps, size=(rows, 1))
        return (start + step * np.arange(length)[None, :]) % len(ALNUM)

    def _gen_copy(self, rng, rows, length):
        out = np.empty((rows, length), dtype=np.int64)
        alphabet = np.array(LOWERCASE)
        for r in range(rows):
            period = rng.choice(self.copy_periods)
            word = alphabet[rng.integers(0, len(alphabet), size=period)]
            out[r] = np.resize(word, length)                   # word, word, word, ... cut to length
        return out

    def _gen_markov(self, rng, rows, length):
        out = np.empty((rows, length), dtype=np.int64)
        out[:, 0] = rng.integers(0, len(ALNUM), size=rows)
        for t in range(1, length):
            # Inverse-CDF sampling of the next symbol, vectorised over rows.
            u = rng.random(rows)[:, None]
            nxt = (self._cumulative[out[:, t - 1]] < u).sum(axis=1)
            out[:, t] = np.minimum(nxt, len(ALNUM) - 1)
        return out

    def _gen_dyck(self, rng, rows, length):
        out = np.empty((rows, length), dtype=np.int64)
        stack = np.zeros((rows, self.dyck_max_depth), dtype=np.int64)  # bracket type per open level
        depth = np.zeros(rows, dtype=np.int64)
        openers, closers = np.array(OPENERS), np.array(CLOSERS)
        idx = np.arange(rows)
        for t in range(length):
            # Open a new bracket (always at depth 0, never at max depth, else with probability 1/2).
            want_open = rng.random(rows) < 0.5
            do_open = (depth == 0) | ((depth < self.dyck_max_depth) & want_open)
            kind = rng.integers(0, len(openers), size=rows)
            top = stack[idx, np.maximum(depth - 1, 0)]            # the innermost open bracket
            out[:, t] = np.where(do_open, openers[kind], closers[top])
            stack[idx[do_open], depth[do_open]] = kind[do_open]
            depth = np.where(do_open, depth + 1, depth - 1)
        return out

    def sample_batch(self, split: str, batch_size: int, seq_len: int, rng: np.random.Generator):
        """Return ``(x, y, lang_ids)``: inputs and next-token targets [B, seq_len], language id per row [B]."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not known; allowed: {', '.join(SPLITS)}")
        # The split only selects an independent random stream (see batch_rng); the languages are
        # infinite, so train and val are two disjoint-in-practice samples of the same distribution.
        generators = (self._gen_counting, self._gen_copy, self._gen_markov, self._gen_dyck)
        lang_ids = rng.integers(0, len(generators), size=batch_size)
        tokens = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for lang, gen in enumerate(generators):
            rows = np.flatnonzero(lang_ids == lang)
            if rows.size:
                tokens[rows] = gen(rng, rows.size, seq_len + 1)
        tokens = torch.from_numpy(tokens)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.from_numpy(lang_ids)

    def decode(self, tokens) -> str:
        return "".join(SYMBOLS[int(t)] for t in _flat(tokens))


# --------------------------------------------------------------------------------------------------
# "stdlib": characters of the Python standard library's source
# --------------------------------------------------------------------------------------------------

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@functools.lru_cache(maxsize=4)
def read_stdlib_source(max_bytes: int) -> str:
    """Concatenate stdlib ``.py`` files (sorted, deterministic order) until ``max_bytes`` characters."""
    root = sysconfig.get_paths()["stdlib"]
    pieces, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)   # also fixes the walk order
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, filename), encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            pieces.append(text + "\n\n")
            total += len(pieces[-1])
            if total >= max_bytes:
                return "".join(pieces)[:max_bytes]
    if not pieces:
        raise RuntimeError(f"no .py files found under the stdlib path {root!r}")
    return "".join(pieces)[:max_bytes]


class StdlibChars:
    """Character-level Python source; token = ASCII code, anything non-ASCII = token 0."""

    name = "stdlib"
    language_names = ("python",)
    vocab_size = 128
    val_fraction = 0.1

    def __init__(self, max_bytes: int = 2_000_000):
        text = read_stdlib_source(int(max_bytes))
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        codes[codes >= self.vocab_size] = 0
        n_val = max(int(len(codes) * self.val_fraction), 1)
        self.split_tokens = {"train": codes[:-n_val], "val": codes[-n_val:]}

    def sample_batch(self, split: str, batch_size: int, seq_len: int, rng: np.random.Generator):
        """Random windows of the split: ``(x, y, lang_ids)`` with lang_ids all 0 (one language)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not known; allowed: {', '.join(SPLITS)}")
        data = self.split_tokens[split]
        if len(data) <= seq_len + 1:
            raise ValueError(f"the {split} split has {len(data)} characters, too few for seq_len={seq_len}")
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        windows = torch.from_numpy(data[starts[:, None] + np.arange(seq_len + 1)[None, :]])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), torch.zeros(batch_size, dtype=torch.long)

    def decode(self, tokens) -> str:
        return "".join("\N{REPLACEMENT CHARACTER}" if int(t) == 0 else chr(int(t)) for t in _flat(tokens))


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

DATASETS = {"languages": SyntheticLanguages, "stdlib": StdlibChars}


def get_dataset(name: str, **options):
    """Build the dataset called ``name`` (a key of ``DATASETS``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available datasets: {', '.join(DATASETS)}")
    return DATASETS[name](**options)


def build_dataset(cfg):
    """The dataset a training config names (``dataset``; ``stdlib_max_bytes`` caps the stdlib corpus)."""
    options = {"max_bytes": cfg.stdlib_max_bytes} if cfg.dataset == "stdlib" else {}
    return get_dataset(cfg.dataset, **options)


def get_batch(dataset, cfg, split: str, step: int, device: str | torch.device = "cpu"):
    """Batch number ``step`` of ``split``: (x, y, lang_ids), the same on every call and every machine."""
    x, y, lang_ids = dataset.sample_batch(split, cfg.batch_size, cfg.seq_len, batch_rng(cfg.seed, split, step))
    return x.to(device), y.to(device), lang_ids.to(device)


def decode(tokens, dataset: str = "languages") -> str:
    """Tokens (list / tensor / array of ids) -> printable text, for the named dataset."""
    return _default_instance(dataset).decode(tokens)


_default_instance = functools.lru_cache(maxsize=None)(get_dataset)     # one instance per name, built on first use


def _flat(tokens):
    if isinstance(tokens, torch.Tensor):
        return tokens.reshape(-1).tolist()
    return np.asarray(tokens).reshape(-1).tolist()


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "languages"
    ds = get_dataset(name)
    x, y, lang = ds.sample_batch("train", 8, 64, batch_rng(0, "train", 0))
    print(f"dataset={name} vocab_size={ds.vocab_size}")
    for row, l in zip(x, lang):
        print(f"{ds.language_names[int(l)]:>9} | {ds.decode(row)!r}")
