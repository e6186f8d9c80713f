"""Models: resolving `--model` references, inspecting GGUF files, tiny test models."""
