"""Calibration: data windows and the statistics (C_x, C_g, weight gradients) of every Linear.

The package itself is callable: ``obdk.calibrate(model, data, stats=("cx", "cg"))``
is :func:`obdk.calibrate.stats.calibrate`, while ``obdk.calibrate.data`` and
``obdk.calibrate.stats`` stay importable submodules.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .stats import calibrate
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
