"""Engines behind one protocol: the native PyTorch engine and the vLLM adapter."""

from server.engine.request import EngineRequest, RequestOutput, SamplingParams, SamplingParamsError


def __getattr__(name):  # LLM pulls in torch and transformers: import it only when used
    if name == "LLM":
        from server.engine.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "EngineRequest", "RequestOutput", "SamplingParams", "SamplingParamsError"]
