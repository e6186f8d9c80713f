"""The web console in a real headless Chromium (Debian's, driven by Playwright), against real nodes.

Screenshots go to test-output/console/ (or $MESH_LLM_TEST_OUTPUT/console/).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM, LOCAL, REPO, free_port, wait_for
from tests.test_e2e_split import CTX, SPEC

pytestmark = [pytest.mark.engine, pytest.mark.browser]  # conftest skips without Playwright or Chromium
# Flags for a closed network: no background calls home, no sandbox as root, no GPU in a VM.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
OUT = Path(os.environ.get("MESH_LLM_TEST_OUTPUT") or REPO / "test-output") / "console"
GEMMA = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watched:
    """A page whose console errors and uncaught exceptions are collected."""

    def __init__(self, browser, url: str, width: int = 1366, height: int = 900) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url)

    def close(self) -> None:
        self.context.close()

    def node_blocks(self) -> int:
        return self.page.locator("#cluster-bar .node-block").count()

    def chat(self, text: str) -> None:
        self.page.fill("#chat-input", text)
        self.page.press("#chat-input", "Enter")

    def count_reply_updates(self) -> None:
        """Count how often the newest reply bubble's text changes (streaming shows many)."""
        self.page.evaluate(
            """() => {
              window.replyUpdates = 0;
              new MutationObserver(() => { window.replyUpdates += 1; })
                .observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
            }"""
        )

    def shot(self, name: str) -> Path:
        path = OUT / name
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=str(path), full_page=True)
        return path


def console_args(port: int) -> tuple[str, ...]:
    return ("--console", str(port), *LOCAL)


def test_two_node_split_appears_live_chats_and_survives_a_restart(browser, start_node, split_model) -> None:
    a_console = free_port()
    a_args = ("--model", str(split_model), *CTX, "--split", "--tensor-split", "1,3", *console_args(a_console))
    a = start_node(*a_args)
    a.wait_output("Waiting for more peers")
    view = Watched(browser, f"http://localhost:{a_console}/")
    page = view.page
    try:
        # One node, its model waiting for peers, the reason on the page; no errors while loading.
        page.wait_for_selector("#cluster-bar .node-block")
        assert view.node_blocks() == 1
        page.wait_for_selector(f'.model[data-model="{SPEC.name}"][data-state="waiting"]')
        assert "Waiting for more peers" in page.inner_text("#models")
        assert page.get_attribute("#conn", "data-state") == "live"
        # Its start-up work is done once the chat's model list came back from /v1/models.
        page.wait_for_selector(f'#chat-model option[value="{SPEC.name}"]', state="attached")
        assert view.errors == []

        # The token on the page is the node's, and its copy button copies the join command.
        assert page.inner_text("#join-cmd") == f"mesh-llm --join {a.token()}"
        page.click("#copy-token")
        assert page.evaluate("navigator.clipboard.readText()") == f"mesh-llm --join {a.token()}"
        client_token = a.wait_output("Client token: ").split("Client token: ", 1)[1].split()[0]
        assert page.inner_text("#client-join-cmd") == f"mesh-llm --join {client_token}"

        # The chat shows the upstream's refusal in place while the model waits.
        view.chat("hello?")
        page.wait_for_selector("[data-testid=chat-error]")
        assert "Waiting for more peers" in page.inner_text("[data-testid=chat-error]")
        page.click("#chat-clear")
        view.errors.clear()  # Chromium logs the 503 itself ("Failed to load resource"): expected here

        # A second node joins: two blocks and the split appear without a reload.
        b = start_node("--model", str(split_model), *CTX, "--split", "--max-vram", "1", "--join", a.token(), *LOCAL)
        page.wait_for_function("document.querySelectorAll('#cluster-bar .node-block').length === 2", timeout=60_000)
        page.wait_for_selector(f'.model[data-model="{SPEC.name}"][data-state="ready"]', timeout=120_000)
        assert page.locator(".layer-seg").count() == 2
        b_id = b.node_id()
        block = page.locator(f'#cluster-bar .node-block[data-node-id="{b_id}"]')
        assert block.get_attribute("data-role") == "worker"
        assert "layers 0–2 · 25%" in block.inner_text()
        assert "layers 3–7 + output · 75%" in page.inner_text("#cluster-bar .node-block >> nth=0")

        # Agent commands carry the real model id and API port.
        assert f"GOOSE_MODEL={SPEC.name}" in page.inner_text("#agent-body") and f"localhost:{a.port}" in page.inner_text("#agent-body")
        page.get_by_role("tab", name="pi", exact=True).click()
        assert f'"id": "{SPEC.name}"' in page.inner_text("#agent-body")

        # A chat message gets a streamed reply through the split.
        view.count_reply_updates()
        view.chat("Tell me about the mesh")
        page.wait_for_selector(".msg.assistant[data-done]", timeout=60_000)
        reply = page.inner_text(".msg.assistant")
        assert reply.strip(), "empty reply"
        assert page.evaluate("window.replyUpdates") > 3, "the reply arrived in one piece, not streamed"
        assert view.errors == []
        view.shot("two-node-split-tiny.png")

        # The node goes away and comes back: the page says so, reconnects and shows it again.
        a.stop()
        page.wait_for_selector('#conn[data-state="reconnecting"]', timeout=20_000)
        assert page.is_visible("#offline")
        a2 = start_node(*a_args, port=a.port, state_dir=a.state_dir)
        page.wait_for_selector('#conn[data-state="live"]', timeout=60_000)
        wait_for(lambda: page.locator(f'#cluster-bar .node-block[data-node-id="{a2.node_id()}"]').count() == 1, timeout=30, what="A back on the page")
        assert not page.is_visible("#offline")
        view.errors.clear()  # Chromium logs the refused reconnects while the node was down
        # Live again: the page follows the split re-forming with B, with no errors on the way.
        page.wait_for_selector(f'.model[data-model="{SPEC.name}"][data-state="ready"]', timeout=120_000)
        assert page.locator(".layer-seg").count() == 2
        assert view.errors == []
    finally:
        view.close()


@pytest.mark.gemma
def test_gemma_split_over_two_nodes_chat_streams_and_stops(browser, start_node) -> None:
    a_console, b_console = free_port(), free_port()
    a = start_node("--model", "gemma-3-270m", "--ctx-size", "2048", "--split", "--tensor-split", "1,1", *console_args(a_console))
    start_node("--model", "gemma-3-270m", "--ctx-size", "2048", "--split", "--max-vram", "0.2", "--join", a.token(), *console_args(b_console))
    a.wait_ready(timeout=300)
    # The worker's console shows the same mesh: both nodes, the split, ready.
    view = Watched(browser, f"http://localhost:{b_console}/")
    page = view.page
    try:
        page.wait_for_selector(f'.model[data-model="{GEMMA}"][data-state="ready"]', timeout=60_000)
        assert view.node_blocks() == 2 and page.locator(".layer-seg").count() == 2
        # A question answered in full.
        view.chat("What is the capital of France?")
        page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
        assert any(c.isalpha() for c in page.inner_text(".msg.assistant"))
        # A new conversation and a long answer, stopped midway: what arrived stays, marked as stopped.
        page.click("#chat-clear")
        view.chat("Tell me a fun fact about octopuses.")
        page.wait_for_function("(document.querySelector('.msg.assistant')?.textContent || '').length > 70", timeout=60_000)
        cancelled = a.cancelled_tasks()
        page.click("#chat-stop")
        page.wait_for_selector(".msg.assistant[data-done] .msg-note", timeout=10_000)
        assert "stopped" in page.inner_text(".msg.assistant .msg-note")
        # Stop on B's page ends the generation on A, the host, where llama-server runs.
        wait_for(lambda: a.cancelled_tasks() == cancelled + 1 and a.busy_slots() == 0, timeout=60, what="A's llama-server cancelled")
        assert page.is_visible("#chat-send") and not page.is_visible("#chat-stop")
        assert view.errors == []
        view.shot("two-node-split-gemma-desktop.png")
    finally:
        view.close()
    phone = Watched(browser, f"http://localhost:{a_console}/", width=390, height=844)
    try:
        phone.page.wait_for_selector(f'.model[data-model="{GEMMA}"][data-state="ready"]', timeout=30_000)
        phone.chat("Name three colours of the sea.")
        phone.page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
        width = phone.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width}px wide on a 390px phone"
        assert phone.errors == []
        phone.shot("two-node-split-gemma-phone.png")
    finally:
        phone.close()


def test_models_are_loaded_and_unloaded_from_the_page(browser, start_node, tiny_model, tmp_path) -> None:
    from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model

    # a mixture of experts: its card says so
    extra = write_tiny_model(tmp_path / "page-tiny.gguf", TinyModelSpec(seed=21, name="page-tiny", n_experts=4, n_experts_used=2))
    console = free_port()
    node = start_node("--model", str(tiny_model), "--ctx-size", "512", *console_args(console))
    node.wait_ready()
    view = Watched(browser, f"http://localhost:{console}/")
    page = view.page
    try:
        page.wait_for_selector('.model[data-model="tiny-llama"][data-state="ready"]')
        # a name nobody knows: the node's one-line reason, in place
        page.fill("#load-ref", "no-such-model-anywhere")
        page.click("#load-btn")
        page.wait_for_selector("#load-note.bad")
        assert "unknown model 'no-such-model-anywhere'" in page.inner_text("#load-note")
        view.errors.clear()  # Chromium logs the 404 itself
        # a real file: it appears, loads and serves, then goes again
        page.fill("#load-ref", str(extra))
        page.click("#load-btn")
        page.wait_for_selector('.model[data-model="page-tiny"][data-state="ready"]', timeout=60_000)
        assert [m["id"] for m in json_get(f"{node.base_url}/v1/models")["data"]] == ["tiny-llama", "page-tiny"]
        assert "MoE\n4 experts, 2 active" in page.inner_text('.model[data-model="page-tiny"] .facts')
        assert "MoE" not in page.inner_text('.model[data-model="tiny-llama"] .facts')  # dense
        view.shot("moe-card.png")
        page.click('.model[data-model="page-tiny"] [data-testid=unload]')
        page.wait_for_selector('.model[data-model="page-tiny"]', state="detached", timeout=60_000)
        # the card can go (status poll) before the unload call itself answers
        page.wait_for_selector('#load-note:has-text("Unloaded page-tiny")', timeout=30_000)
        assert [m["id"] for m in json_get(f"{node.base_url}/v1/models")["data"]] == ["tiny-llama"]
        assert view.errors == []
        view.shot("load-unload.png")
    finally:
        view.close()


def json_get(url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_the_demand_card_shows_requests_and_a_pickup(browser, start_node, tiny_model, tmp_path) -> None:
    from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model

    spare = write_tiny_model(tmp_path / "spare-tiny.gguf", TinyModelSpec(seed=22, name="spare-tiny"))
    console = free_port()
    node = start_node("--model", str(tiny_model), "--on-demand", str(spare), "--ctx-size", "512", *console_args(console))
    node.wait_ready()
    view = Watched(browser, f"http://localhost:{console}/")
    page = view.page
    try:
        page.wait_for_selector("#demand-summary:has-text('on demand here: spare-tiny')")
        post_json(f"{node.base_url}/v1/completions", {"model": "spare-tiny", "prompt": "hi", "max_tokens": 2})  # waits for the pickup
        page.wait_for_selector("[data-testid=demand-decisions] li:has-text('picking up spare-tiny')", timeout=60_000)
        assert "served by nobody" in page.inner_text("[data-testid=demand-decisions]")
        row = page.locator("[data-testid=demand-models] tr", has_text="spare-tiny")
        assert row.locator("td").nth(1).inner_text() == "1" and row.locator("td").nth(3).inner_text() == "1"
        assert view.errors == []
        view.shot("demand.png")
    finally:
        view.close()


def post_json(url: str, body: dict) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())
