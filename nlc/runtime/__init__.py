"""The layers that generated models instantiate. Imports only torch and nlc.ops, never the front end."""

from nlc.ops.memory.rule import Structure
from nlc.runtime.attention import AttentionLayer, AttentionState
from nlc.runtime.cms import CmsLayer, CmsLevelState, CmsState
from nlc.runtime.config import (
    Adaptive,
    AttentionConfig,
    CmsConfig,
    CmsLevelConfig,
    GateSpec,
    MemoryConfig,
    MlpConfig,
    Pipeline,
    Source,
    Transform,
)
from nlc.runtime.memory import MemoryLayer, MemoryLayerState
from nlc.runtime.mlp import MlpLayer

__all__ = [
    "Adaptive",
    "AttentionConfig",
    "AttentionLayer",
    "AttentionState",
    "CmsConfig",
    "CmsLayer",
    "CmsLevelConfig",
    "CmsLevelState",
    "CmsState",
    "GateSpec",
    "MemoryConfig",
    "MemoryLayer",
    "MemoryLayerState",
    "MlpConfig",
    "MlpLayer",
    "Pipeline",
    "Source",
    "Structure",
    "Transform",
]
