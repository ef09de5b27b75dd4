"""Kernels for what the runtime layers compute: `nlc.ops.memory` (the oracle, the contract and the dispatch),
`nlc.ops.matrix` and `nlc.ops.network` (fast paths for matrix and network memories)."""
