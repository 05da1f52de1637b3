"""Data-only package: the shipped device profile YAML files."""
