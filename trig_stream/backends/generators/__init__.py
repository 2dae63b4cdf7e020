"""Generator backends: diffusers pipelines, image folders, image APIs and DTM prompt rewriting.

Each module is imported only when a run names its backend (see
:mod:`trig_stream.backends.registry`), and none imports torch or diffusers at import time.
"""
