"""The project's Triton kernels, installed as `cec_kernels` (setup.py); the engine imports them by that name only.

With the repository root on sys.path (`python -m pytest`, `python infer.py`, scripts that put it there) this folder
is also importable as `kernels`, the name of the Hub's kernels package that transformers (5.25 and later: every
model import) loads. Imported under that name, it hands the name on to the installed package, so transformers never
sees this folder in its place.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.realpath(__file__)
    _root = os.path.dirname(os.path.dirname(_here))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])
    # (this file again, through another spelling of the root, would be itself: keep it then)
    if _spec is not None and _spec.origin and os.path.realpath(_spec.origin) != _here:
        # importing a module returns what sys.modules holds for it once its code has run
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["kernels"])
