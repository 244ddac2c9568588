"""Data files of the converter: the official parameter trees (``trees/``)."""
