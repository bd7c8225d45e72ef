"""shardserve: serve LLMs split across processes, GPUs and nodes (TP x PP), with vLLM's API."""
from shardserve.core.outputs import CompletionOutput, Logprob, RequestOutput
from shardserve.sampling_params import SamplingParams

__version__ = "0.1.0"


def _configure_logging() -> None:
    """shardserve's lines (start-up facts, warnings) go to stderr at SHARDSERVE_LOGGING_LEVEL, as vLLM's do, unless
    the application already gave the "shardserve" logger a handler."""
    import logging

    from shardserve.distributed import env

    logger = logging.getLogger("shardserve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(env.logging_level())
        logger.propagate = False


_configure_logging()
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    if name == "LLM":                       # imported lazily: torch and transformers are heavy
        from shardserve.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)
