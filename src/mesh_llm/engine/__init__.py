"""The llama.cpp engine: finding or building its binaries and running them."""
