"""Network memories (and grouped matrix writes): `chunk` (PyTorch, the dual form) and `triton` (kernels)."""
