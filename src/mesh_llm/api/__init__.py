"""The HTTP surface of a node: the OpenAI-compatible proxy on :9337 and the web console."""
