"""Copy-paste commands for agents and clients, filled with the real model id and port (pure)."""

from __future__ import annotations

import functools
import json
import shlex


def pi_models_json(model_id: str, base_url: str, context_window: int) -> str:
    """The `mesh` provider block for ~/.pi/agent/models.json."""
    provider = {
        "providers": {
            "mesh": {
                "api": "openai-completions",
                "apiKey": "mesh",
                "baseUrl": base_url,
                "models": [
                    {
                        "id": model_id,
                        "name": f"{model_id} (Mesh)",
                        "contextWindow": context_window,
                        "maxTokens": min(8192, context_window),
                        "input": ["text"],
                        "compat": {
                            "maxTokensField": "max_tokens",
                            "supportsDeveloperRole": False,
                            "supportsUsageInStreaming": False,
                        },
                    }
                ],
            }
        }
    }
    return json.dumps(provider, indent=2)


@functools.lru_cache(maxsize=64)  # the console rebuilds its status every second
def agent_commands(model_id: str, port: int, context_window: int = 0) -> dict[str, str]:
    """Shell lines to paste. Model names may come from other nodes: every one is shell-quoted.
    A context window of 0 (not known here) stands for 4096."""
    context_window = context_window or 4096
    host = f"http://localhost:{port}"
    base = f"{host}/v1"
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "hello"}]})
    q = shlex.quote
    return {
        "curl": f"curl {base}/chat/completions -H 'Content-Type: application/json' -d {q(body)}",
        "goose": f"GOOSE_PROVIDER=openai OPENAI_HOST={host} OPENAI_API_KEY=mesh GOOSE_MODEL={q(model_id)} goose session",
        "opencode": f"OPENAI_API_KEY=dummy OPENAI_BASE_URL={base} opencode -m {q('openai/' + model_id)}",
        "pi": f"pi --model {q('mesh/' + model_id)}   (add the provider below to ~/.pi/agent/models.json)",
        "pi models.json": pi_models_json(model_id, base, context_window),
    }
