"""Datasets: determinism, vocabulary bounds, and that the synthetic languages really are different."""
import numpy as np
import pytest
import torch

from fastmoe_edu import data as D


@pytest.fixture(scope="module")
def languages():
    return D.get_dataset("languages")


@pytest.fixture(scope="module")
def stdlib():
    return D.get_dataset("stdlib", max_bytes=300_000)


def batch(ds, split="train", step=0, seed=0, batch_size=64, seq_len=48):
    return ds.sample_batch(split, batch_size, seq_len, D.batch_rng(seed, split, step))


@pytest.mark.parametrize("name", ["languages", "stdlib"])
def test_deterministic_given_seed_split_step(name, languages, stdlib):
    ds = languages if name == "languages" else stdlib
    a, b = batch(ds, step=3), batch(ds, step=3)
    for t1, t2 in zip(a, b):
        assert torch.equal(t1, t2)
    assert not torch.equal(a[0], batch(ds, step=4)[0])               # another step
    assert not torch.equal(a[0], batch(ds, seed=1, step=3)[0])       # another seed
    assert not torch.equal(a[0], batch(ds, split="val", step=3)[0])  # another split


@pytest.mark.parametrize("name", ["languages", "stdlib"])
def test_shapes_vocab_and_shift(name, languages, stdlib):
    ds = languages if name == "languages" else stdlib
    x, y, lang = batch(ds, batch_size=16, seq_len=32)
    assert x.shape == y.shape == (16, 32) and lang.shape == (16,)
    assert x.dtype == y.dtype == lang.dtype == torch.long
    assert 0 <= int(x.min()) and int(x.max()) < ds.vocab_size
    assert torch.equal(x[:, 1:], y[:, :-1])                           # targets are the next tokens
    assert 0 <= int(lang.min()) and int(lang.max()) < len(ds.language_names)


def test_languages_are_fixed_by_language_seed_not_training_seed():
    assert np.array_equal(D.SyntheticLanguages().transition, D.SyntheticLanguages().transition)
    assert not np.array_equal(D.SyntheticLanguages(0).transition, D.SyntheticLanguages(1).transition)


def rows_of(languages, name, n=256, seq_len=64):
    x, y, lang = batch(languages, batch_size=n, seq_len=seq_len)
    tokens = torch.cat([x, y[:, -1:]], dim=1).numpy()
    return tokens[lang.numpy() == languages.language_names.index(name)]


def test_every_language_appears(languages):
    _, _, lang = batch(languages, batch_size=256)
    assert set(lang.tolist()) == set(range(len(languages.language_names)))


def test_counting_is_an_arithmetic_progression(languages):
    rows = rows_of(languages, "counting")
    diffs = np.diff(rows, axis=1) % len(D.ALNUM)
    assert (diffs == diffs[:, :1]).all()
    assert set(diffs[:, 0]) <= set(languages.steps)


def test_copy_repeats_a_word(languages):
    rows = rows_of(languages, "copy")
    period = languages.copy_periods[0]
    assert (rows[:, period:] == rows[:, :-period]).all()
    assert np.isin(rows, D.LOWERCASE).all()


def test_markov_follows_its_transition_table(languages):
    rows = rows_of(languages, "markov")
    assert (languages.transition[rows[:, :-1], rows[:, 1:]] > 0).all()
    assert np.allclose(languages.transition.sum(axis=1), 1.0)


def test_dyck_is_well_nested(languages):
    rows = rows_of(languages, "dyck")
    assert np.isin(rows, D.OPENERS + D.CLOSERS).all()
    for row in rows:
        stack = []
        for token in row:
            if token in D.OPENERS:
                stack.append(D.OPENERS.index(token))
            else:
                assert stack and stack.pop() == D.CLOSERS.index(token)
            assert len(stack) <= languages.dyck_max_depth


def test_languages_have_different_token_statistics(languages):
    hist = {}
    for name in languages.language_names:
        rows = rows_of(languages, name, n=512)
        hist[name] = np.bincount(rows.ravel(), minlength=languages.vocab_size) / rows.size
    names = list(hist)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            total_variation = 0.5 * np.abs(hist[a] - hist[b]).sum()
            assert total_variation > 0.2, (a, b, total_variation)


def test_decode(languages, stdlib):
    assert D.decode([0, 1, 10, 56, 57]) == "01a()"
    assert languages.decode(torch.tensor([[62, 63]])) == "<>"
    text = stdlib.decode(batch(stdlib, batch_size=1, seq_len=40)[0][0])
    assert len(text) == 40
    assert D.decode([ord(c) for c in "def f():"], dataset="stdlib") == "def f():"


def test_stdlib_corpus(stdlib):
    text = D.read_stdlib_source(300_000)
    assert len(text) == 300_000 and "def " in text and "import " in text
    assert len(stdlib.split_tokens["val"]) == 30_000
    assert len(stdlib.split_tokens["train"]) + len(stdlib.split_tokens["val"]) == 300_000
    _, _, lang = batch(stdlib)
    assert lang.eq(0).all()


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown dataset 'shakespeare'.*languages, stdlib"):
        D.get_dataset("shakespeare")
    with pytest.raises(ValueError, match="split='test'"):
        D.batch_rng(0, "test", 0)
