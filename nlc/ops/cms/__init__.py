"""The CMS `objective = task` chunk write: `naive` (PyTorch ops, the reference), `triton` (one fused kernel per
weight) and `dispatch` (which of the two `CmsLayer.learn` runs). README.md beside this file has the maths."""
