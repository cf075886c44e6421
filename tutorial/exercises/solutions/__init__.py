"""The answer key: one model answer per exercise file, the same names, signatures and docstrings as the stubs.

Written in plain PyTorch without fastmoe_edu's routing or dispatch functions (that would be no answer at
all); only the parallel exercises use the project's ``Communicator``, which is what they are about.
``python -m tutorial.exercises.check --solutions`` checks these files; tests/test_exercises.py makes sure
they keep passing and that the stubs keep failing with their hints.
"""
