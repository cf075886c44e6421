"""What every check shares: the Hint a failed check raises, calling the student's function, comparing tensors.

A check never prints the answer. It says *what* is wrong and *where* (which shape, which token and slot,
which expert, which rank), and points at the idea that fixes it.
"""
from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

EXERCISES_DIR = Path(__file__).resolve().parent
ROOT = EXERCISES_DIR.parents[1]


class Hint(Exception):
    """A check failed; the message is what the student reads."""


@dataclass
class Result:
    """The outcome of one exercise's check: ``hint`` is None when it passed."""
    exercise: str
    hint: str | None = None

    @property
    def passed(self) -> bool:
        return self.hint is None


def display_path(path: str | Path) -> str:
    """A file's path relative to the repository root when it lies inside it (the student's view)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def call(module, name: str, *args, **kwargs):
    """``module.name(*args, **kwargs)``, with whatever goes wrong turned into a Hint that names the place.

    NotImplementedError is named by the innermost function of the student's files that raised it, so a
    pipeline that calls an unwritten exercise-8 function says which one is still missing.
    """
    function = getattr(module, name, None)
    module_file = getattr(module, "__file__", None) or "the exercise file"
    if function is None:
        raise Hint(f"{display_path(module_file)} has no function {name}(): keep the stub's name and signature")
    student_dir = Path(inspect.getfile(function)).resolve().parent
    try:
        return function(*args, **kwargs)
    except Hint:
        raise
    except NotImplementedError as error:
        frame = _innermost_frame_in(error, student_dir)
        where = f"{frame.name}() in {display_path(frame.filename)}" if frame else f"{name}()"
        raise Hint(f"{where} is not written yet: it raises NotImplementedError. Replace the `raise` with your "
                   f"code (the equation is in its docstring).") from None
    except Exception as error:                                             # noqa: BLE001 (any bug of theirs)
        frame = _innermost_frame_in(error, student_dir)
        where = f" at {display_path(frame.filename)}:{frame.lineno} in {frame.name}()" if frame else ""
        raise Hint(f"{name}() raised {type(error).__name__}: {error}{where}") from None


def _innermost_frame_in(error: BaseException, folder: Path):
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve().parent == folder]
    return frames[-1] if frames else None


def expect_tensor(what: str, value, shape: tuple[int, ...], meaning: str, integer: bool = False) -> torch.Tensor:
    """``value`` must be a tensor of ``shape`` (``meaning`` says it in symbols, e.g. "[T, k]")."""
    if not isinstance(value, torch.Tensor):
        raise Hint(f"{what} is a {type(value).__name__}, not a torch.Tensor {meaning}")
    if tuple(value.shape) != tuple(shape):
        raise Hint(f"{what} has shape {tuple(value.shape)}; expected {meaning} = {tuple(shape)}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex):
        raise Hint(f"{what} holds {value.dtype} values; it holds indices or counts: an integer tensor (int64)")
    if not integer and value.dtype != torch.float64:
        raise Hint(f"{what} holds {value.dtype} values; the check's inputs are float64: keep their dtype (no "
                   f".float(), no integer results)")
    return value


def expect_pair(what: str, value) -> tuple:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise Hint(f"{what} should return a pair (two values), got {type(value).__name__}")
    return tuple(value)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Elementwise |a − b| <= tol·(1 + |b|), as a bool tensor (inputs are float64 in every check)."""
    return (a.detach().double() - b.detach().double()).abs() <= tol * (1 + b.detach().double().abs())


def all_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-8) -> bool:
    return a.shape == b.shape and bool(close(a, b, tol).all())


def first_bad_row(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-8) -> int | None:
    """The first index along dim 0 where a and b differ (rows of any width), or None."""
    ok = close(a, b, tol).reshape(a.shape[0], -1).all(dim=1) if a.numel() else torch.ones(a.shape[0], dtype=torch.bool)
    bad = (~ok).nonzero()
    return int(bad[0]) if bad.numel() else None
