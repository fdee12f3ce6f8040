"""FlexWrangle's offloading inference engine: the public API."""
from .compression import CompressionConfig
from .config import ModelConfig
from .generate import LLM
from .policy import Policy
from .tiers import MemoryBudgetError
from .weights import CheckpointError

__all__ = ["LLM", "Policy", "CompressionConfig", "ModelConfig", "MemoryBudgetError", "CheckpointError"]
