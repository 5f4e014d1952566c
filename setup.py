"""The optional C speed-up of the frame scanner; everything else is in pyproject.toml.

`optional=True`: where it cannot be compiled (no compiler, no Python headers),
the install goes on and wsgate uses its pure-Python scanner.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("wsgate._speedups", ["wsgate/_speedups.c"], optional=True)])
