"""What measures or checks a served repository from outside: the benchmark and the soak.

Shared here: the JPEG corpus (``corpus``), readings of the host (``probe``) and the in-process
runner of a generated repository's chain (``chain``).
"""
