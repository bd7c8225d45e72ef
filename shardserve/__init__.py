"""shardserve: serve LLMs split across processes, GPUs and nodes (TP x PP), with vLLM's API."""
from shardserve.core.outputs import CompletionOutput, Logprob, RequestOutput
from shardserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    if name == "LLM":                       # imported lazily: torch and transformers are heavy
        from shardserve.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)
