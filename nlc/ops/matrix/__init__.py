"""Fast paths for matrix memories (state `M: [d_v, d_k]` per head): `chunk`, exact chunkwise PyTorch, and
`triton`, GPU kernels of the same chunk form."""
