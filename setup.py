"""Packaging: everything is in setup.cfg except the twistd plugin.

`twisted/plugins/` is a namespace directory without `__init__.py` (twistd scans
it), so it is shipped as data next to the package rather than as a package.
"""

from setuptools import setup

setup(
    data_files=[("twisted/plugins", [])],
    py_modules=["twisted.plugins.exposrd"],
)
