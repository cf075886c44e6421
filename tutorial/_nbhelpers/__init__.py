"""Helper code of the tutorial notebooks, kept out of their cells so that the cells stay short.

The notebooks import from here (their kernel runs in tutorial/) and show the source on demand.
"""
