"""Fused block-sparse attention kernels (Triton) and their launchers.

Import :mod:`.launch` only when the kernels are needed: importing it imports Triton, and
``TRITON_INTERPRET=1`` must be set before that to run the kernels on the CPU.
"""
