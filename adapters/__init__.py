"""Built-in architecture adapters, registered through the plugin host like any plugin's."""

from editkit.hookspecs import hookimpl

from .base import Adapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .neox import GPTNeoXAdapter

__all__ = ["Adapter", "GPT2Adapter", "LlamaAdapter", "GPTNeoXAdapter"]


@hookimpl
def register_adapters(register):
    for adapter in (GPT2Adapter, LlamaAdapter, GPTNeoXAdapter):
        register(adapter)
