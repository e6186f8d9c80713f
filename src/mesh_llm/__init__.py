"""mesh-llm: pool several machines into one OpenAI-compatible LLM API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mesh-llm")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
