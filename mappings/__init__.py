"""Declarative mappings from official Haiku checkpoints to perceiver_torch models.

Installed as ``converter.mappings``; the YAML files are package data.
"""
