"""The exercise track: FastMoE's data flow and the parallel techniques, written by you, checked by a command.

Edit ``exNN_<name>.py`` (each function has its signature, docstring and equation, and raises
NotImplementedError), then run from the repository root::

    python -m tutorial.exercises.check 3

README.md in this folder lists the exercises; ``solutions/`` holds the answer key.
"""
