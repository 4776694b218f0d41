"""Triton kernels of obdk, installed as ``obdk.kernels``.

Each module holds the ``@triton.jit`` kernels and their launchers; the
operators that call them are declared in :mod:`obdk.ops`. Importing this
package does not import Triton; the kernel modules do.
"""
