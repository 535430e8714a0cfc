"""A toy job type with a model kind of its own, added the way docs/adding-a-job-type.md says.

It lives in the test tree: one package (``spec.py``, ``run.py``, ``model.py``, ``demo.py``) and one
registry line (``registry.py``); the test runs it through the API and a real worker.
"""
