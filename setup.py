"""Package list only; every other setting is in pyproject.toml.

Subpackages of edge_alast are discovered (find_packages), so a new one needs no edit here. The shipped device
profiles live in the top-level device_profiles/ folder and install as edge_alast.device_profiles
([tool.setuptools.package-dir] in pyproject.toml); pyproject's own packages.find cannot add a package that is
mapped from outside the edge_alast tree, hence this file.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["edge_alast", "edge_alast.*"]) + ["edge_alast.device_profiles"])
