// mesh-llm console: renders /api/status, follows /api/events, chats through /v1.
// Everything that came from the mesh (names, models) is untrusted: it goes in with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { status: null, receivedAt: 0, agentTab: "goose", busy: null, history: [], routes: "", modelsFetch: 0, chatRun: 0, drawn: {} };
const AGENT_TABS = [["goose", ["goose"]], ["pi", ["pi", "pi models.json"]], ["opencode", ["opencode"]], ["curl", ["curl"]]];

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") Object.assign(el.style, v);
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

function fmtBytes(b) {
  if (!b) return "0 GB";
  if (b >= 1e9) return (b / 1e9).toFixed(b >= 1e10 ? 1 : 2) + " GB";
  if (b >= 1e6) return (b / 1e6).toFixed(b >= 1e8 ? 0 : 1) + " MB";
  return Math.max(1, Math.round(b / 1e3)) + " kB";
}
const short = (id) => (id || "").slice(0, 8);
const pct = (x) => Math.round(x * 100) + "%";
function layersText(s) {
  const span = s.first <= s.last ? (s.first === s.last ? `layer ${s.first}` : `layers ${s.first}–${s.last}`) : "no layers";
  return s.output ? span + " + output" : span;
}

// ---------------------------------------------------------------- copy buttons

async function copyText(text, button) {
  try {
    if (navigator.clipboard && window.isSecureContext) await navigator.clipboard.writeText(text);
    else {
      const ta = h("textarea", { style: { position: "fixed", opacity: "0" } });
      ta.value = text;
      document.body.append(ta);
      ta.select();
      document.execCommand("copy");
      ta.remove();
    }
    flash(button, "Copied");
  } catch (e) {
    flash(button, "Select & copy");
  }
}
function flash(button, label) {
  const old = button.dataset.label || button.textContent;
  button.dataset.label = old;
  button.textContent = label;
  button.classList.add("copied");
  setTimeout(() => { button.textContent = old; button.classList.remove("copied"); }, 1400);
}

// ---------------------------------------------------------------- rendering

// Redraw a section only when its part of the document changed: RTTs drift every few
// seconds, and a redraw would drop the reader's text selection, focus or open tab.
function redraw(name, part, draw) {
  const key = JSON.stringify(part);
  if (state.drawn[name] === key) return;
  state.drawn[name] = key;
  draw();
}

function render(st) {
  const me = st.node;
  const steady = st.nodes.map(({ rtt_ms, last_seen_secs, ...rest }) => rest);
  redraw("head", [me.name, me.id, me.role, me.version, me.engine, st.mesh, st.api], () => {
    $("whoami").replaceChildren(
      h("b", { text: me.name }), ` · ${short(me.id)} · ${me.role} · v${me.version}` + (me.engine ? ` · engine ${me.engine}` : ""),
    );
    $("mesh-summary").textContent = `${st.mesh.node_count} node${st.mesh.node_count === 1 ? "" : "s"} · ${fmtBytes(st.mesh.total_memory_bytes)} offered`;
    $("foot").textContent = `mesh ${short(st.mesh.id)} · API ${st.api.url}` + (st.api.listen_all ? " (also on this machine's network addresses)" : "");
  });
  redraw("cluster", [steady, st.models], () => renderCluster(st));
  redraw("models", [st.models, st.mesh, st.api.url, me.id], () => renderModels(st));
  $("load-form").hidden = me.role === "client"; // a client runs no models
  redraw("invite", [st.token, st.client_token, me.role], () => renderInvite(st));
  redraw("agents", [st.models, st.api.port], () => renderAgents(st));
  redraw("nodes", st.nodes, () => renderNodes(st));
  redraw("demand", st.demand, () => renderDemand(st));
  syncChatModels(st);
}

function sharesByNode(st) {
  const out = {};
  for (const m of st.models) {
    if (m.state !== "ready" && m.state !== "loading") continue; // nothing held yet
    if (m.split.length) for (const s of m.split) (out[s.node] ||= []).push(`${layersText(s)} · ${pct(s.share)}`);
    else (out[m.host] ||= []).push(`all layers of ${m.name}`);
  }
  return out;
}

function renderCluster(st) {
  const total = st.nodes.reduce((a, n) => a + n.memory_bytes, 0) || 1;
  const shares = sharesByNode(st);
  const blocks = st.nodes.map((n) => {
    const grow = Math.max((n.memory_bytes / total) * 100, 8);
    const fill = n.memory_bytes ? Math.min(1, n.used_bytes / n.memory_bytes) : 0;
    const what = shares[n.id] || [n.role === "client" ? "uses the mesh" : "idle"];
    return h("div", { class: `node-block role-${n.role}`, style: { flexGrow: String(grow) }, "data-node-id": n.id, "data-role": n.role, title: `${n.name} (${n.id})` },
      h("div", { class: "name" }, n.name, n.self ? h("span", { class: "you", text: "you" }) : null),
      h("div", {}, h("span", { class: "badge", text: n.role })),
      h("div", { class: "meta", text: `${short(n.id)} · ${n.device || "no device"} · ${fmtBytes(n.memory_bytes)}` }),
      what.map((w) => h("div", { class: "share", text: w })),
      h("div", { class: "fill", style: { width: pct(fill) } }),
    );
  });
  $("cluster-bar").replaceChildren(...blocks);
}

function renderModels(st) {
  const box = $("models");
  if (!st.models.length) {
    box.replaceChildren(h("div", { class: "empty", text: "No model is served in this mesh yet. Load one above, or start a node with --model." }));
    return;
  }
  box.replaceChildren(...st.models.map((m) => {
    const facts = [
      ["Size", fmtBytes(m.size_bytes)], ["Needs", fmtBytes(m.need_bytes)], ["Context", m.ctx ? m.ctx.toLocaleString() : "—"],
      ["Draft", m.draft || "none"],
      ...(m.moe ? [["MoE", `${m.moe.experts} experts, ${m.moe.experts_used} active`]] : []),
      ...(m.moe && m.moe.shard ? [["Shard", `${m.moe.shard.length} of ${m.moe.experts} experts, no traffic between nodes`]] : []),
      ["Host", `${m.host_name} (${short(m.host)})`], ["Mesh memory", fmtBytes(st.mesh.total_memory_bytes)],
      ["API", st.api.url, "wide"],
    ];
    const split = m.split.length ? h("div", { class: "layers" },
      h("div", { class: "layers-title", text: `Split over ${m.split.length} nodes (layers by share)` }),
      h("div", { class: "layer-strip" }, m.split.map((s) => h("div", {
        class: `layer-seg role-${s.node === m.host ? "host" : "worker"}`, style: { flexGrow: String(Math.max(s.share, 0.02)) },
        title: `${s.node_name}: ${layersText(s)}`, text: `${s.node_name} · ${pct(s.share)}`,
      }))),
      h("div", { class: "layer-legend" }, m.split.map((s) => h("div", { text: `${s.node_name} (${short(s.node)}) — ${layersText(s)}, share ${pct(s.share)}` }))),
    ) : h("div", { class: "model-detail", text: `Runs whole on ${m.host_name}.` });
    return h("div", { class: "model", "data-model": m.name, "data-state": m.state },
      h("div", { class: "model-head" },
        h("span", { class: "model-name", text: m.name }),
        h("span", { class: `pill ${m.state}`, "data-testid": "model-state", text: m.state === "waiting" ? "waiting for peers" : m.state }),
        m.host === st.node.id && m.state !== "unloading"
          ? h("button", { class: "btn", type: "button", "data-testid": "unload", onclick: (e) => unloadModel(m.name, e.currentTarget), text: "Unload" }) : null),
      m.detail && m.state !== "ready" ? h("p", { class: "model-detail", text: m.detail }) : null,
      h("dl", { class: "facts" }, facts.map(([k, v, wide]) => h("div", { class: wide }, h("dt", { text: k }), h("dd", { text: v })))),
      split,
    );
  }));
}

function renderInvite(st) {
  for (const [lineId, buttonId, token] of [["join-cmd", "copy-token", st.token], ["client-join-cmd", "copy-client-token", st.client_token]]) {
    const line = $(lineId);
    const button = $(buttonId);
    if (token) {
      line.textContent = `mesh-llm --join ${token}`;
      line.title = token;
      button.disabled = false;
    } else {
      line.textContent = st.node.role === "client" ? "A client cannot invite: copy the token from a serving node's console." : "The token is shown on this machine only.";
      button.disabled = true;
    }
  }
}

function agentModel(st) {
  const picked = $("chat-model").value;
  return st.models.find((m) => m.name === picked) || st.models.find((m) => m.ready) || st.models[0];
}

function renderAgents(st) {
  const model = agentModel(st);
  $("agents-model").textContent = model ? `filled in for ${model.name} on port ${st.api.port}` : "";
  $("agent-tabs").replaceChildren(...AGENT_TABS.map(([tab]) => h("button", {
    class: "tab", role: "tab", type: "button", "aria-selected": String(tab === state.agentTab), text: tab,
    onclick: () => { state.agentTab = tab; renderAgents(state.status); },
  })));
  if (!model) {
    $("agent-body").replaceChildren(h("div", { class: "empty", text: "Commands appear once the mesh serves a model." }));
    return;
  }
  const keys = AGENT_TABS.find(([tab]) => tab === state.agentTab)[1];
  $("agent-body").replaceChildren(...keys.map((key) => {
    const text = model.commands[key] || "";
    const button = h("button", { class: "btn", type: "button", text: "Copy", onclick: () => copyText(text, button) });
    const label = key === "pi models.json" ? "add to ~/.pi/agent/models.json" : key === "goose" ? "environment + command" : "command";
    return h("div", { class: "cmd", "data-agent": key }, h("div", { class: "cmd-head" }, h("span", { text: label }), button), h("pre", { text }));
  }));
}

function renderNodes(st) {
  $("nodes-body").replaceChildren(...st.nodes.map((n) => h("tr", { "data-node-id": n.id },
    h("td", {}, h("div", {}, n.name, n.self ? h("span", { class: "muted", text: " (this node)" }) : null), h("div", { class: "id", text: short(n.id) })),
    h("td", { class: `role-${n.role}` }, h("span", { class: "badge", text: n.role })),
    h("td", { text: n.device || "—" }),
    h("td", { class: "num", text: n.role === "client" ? "—" : `${fmtBytes(n.used_bytes)} / ${fmtBytes(n.memory_bytes)}` }),
    h("td", { class: "num", text: n.self ? "—" : n.rtt_ms === null ? "measuring" : `${n.rtt_ms.toFixed(1)} ms` }),
    h("td", { text: n.models_on_disk.join(", ") || "—" }),
    h("td", { text: n.models_served.join(", ") || "—" }),
    h("td", { class: "num", "data-seen": n.self ? "" : String(n.last_seen_secs), text: n.self ? "now" : "" }),
    h("td", { class: "num", text: `${n.version}${n.engine ? " · " + n.engine : ""}` }),
  )));
  tickLastSeen();
}

function clock(unix) {
  return new Date(unix * 1000).toLocaleTimeString();
}

function renderDemand(st) {
  const d = st.demand || { models: [], decisions: [], on_demand: [], promoted: [] };
  const parts = [];
  if (d.on_demand.length) parts.push(`on demand here: ${d.on_demand.join(", ")}`);
  if (d.promoted.length) parts.push(`picked up here: ${d.promoted.join(", ")}`);
  if (d.idle_unload_secs) parts.push(`unloaded after ${Math.round(d.idle_unload_secs)} s idle`);
  $("demand-summary").textContent = parts.join(" · ");
  $("demand-body").replaceChildren(...(d.models.length ? d.models.map((m) => h("tr", {},
    h("td", { text: m.model }),
    h("td", { class: "num", text: String(m.requests_per_min) }),
    h("td", { class: "num", text: clock(m.last_active) }),
    h("td", { class: "num", text: String(m.servers) }),
  )) : [h("tr", {}, h("td", { class: "muted", colspan: "4", text: "no requests yet" }))]));
  $("demand-decisions").replaceChildren(...(d.decisions.length ? d.decisions.map((x) =>
    h("li", {}, h("span", { class: "muted", text: `${clock(x.at)} ` }), `${x.action} ${x.model} (${x.reason})`))
    : [h("li", { class: "muted", text: "none yet" })]));
}

function tickLastSeen() {
  const age = (Date.now() - state.receivedAt) / 1000;
  for (const td of document.querySelectorAll("td[data-seen]")) {
    if (td.dataset.seen === "") continue;
    const secs = Math.max(0, Number(td.dataset.seen) + age);
    td.textContent = secs < 2 ? "just now" : `${Math.round(secs)} s ago`;
  }
}

// ---------------------------------------------------------------- live updates

function setConn(kind, text) {
  const el = $("conn");
  el.dataset.state = kind;
  el.querySelector(".conn-text").textContent = text;
  $("offline").hidden = kind !== "reconnecting";
  document.body.classList.toggle("offline", kind === "reconnecting");
}

function accept(st) {
  state.status = st;
  state.receivedAt = Date.now();
  render(st);
}

function follow() {
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => setConn("live", "live"));
  events.addEventListener("status", (e) => { setConn("live", "live"); accept(JSON.parse(e.data)); });
  // The browser retries on its own (the server asks for 2 s); a closed stream is retried by hand.
  events.addEventListener("error", () => {
    setConn("reconnecting", "reconnecting…");
    if (events.readyState === EventSource.CLOSED) setTimeout(follow, 2000);
  });
}

// ---------------------------------------------------------------- chat

async function syncChatModels(st) {
  const key = st.api.models.join("\n");
  if (key === state.routes) return;
  state.routes = key;
  const ticket = ++state.modelsFetch;
  let ids = st.api.models;
  try {
    const res = await fetch("/v1/models");
    if (res.ok) ids = (await res.json()).data.map((m) => m.id);
  } catch (e) { /* keep the list from the status document */ }
  if (ticket !== state.modelsFetch) return; // a newer list is on its way
  const select = $("chat-model");
  const keep = select.value;
  select.replaceChildren(...ids.map((id) => h("option", { value: id, text: id })));
  if (!ids.length) select.append(h("option", { value: "", text: "no model ready yet" }));
  if (ids.includes(keep)) select.value = keep;
  if (state.status) renderAgents(state.status);
}

function addMessage(kind, text) {
  $("chat-empty")?.remove();
  const el = h("div", { class: `msg ${kind}`, text });
  $("chat-log").append(el);
  scrollChat();
  return el;
}

// Follow the reply inside the chat box only (never scroll the page under the reader).
function scrollChat() {
  const log = $("chat-log");
  log.scrollTop = log.scrollHeight;
}

function showError(bubble, message) {
  bubble.classList.remove("streaming", "assistant");
  bubble.classList.add("error");
  bubble.dataset.testid = "chat-error";
  bubble.textContent = message;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error) return `${res.status}: ${body.error.message || body.error}`;
  } catch (e) { /* not JSON */ }
  return `${res.status} ${res.statusText}`;
}

function setBusy(controller) {
  state.busy = controller;
  $("chat-send").hidden = !!controller;
  $("chat-stop").hidden = !controller;
  $("chat-input").disabled = !!controller;
}

// Reads an OpenAI SSE stream, appending each delta; throws on an in-band error event.
async function readStream(res, onText) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || String(event.error));
        const text = event.choices && event.choices[0] && event.choices[0].delta && event.choices[0].delta.content;
        if (text) onText(text);
      }
    }
  }
}

async function send(text) {
  const model = $("chat-model").value;
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant streaming", "");
  const controller = new AbortController();
  const run = ++state.chatRun;
  const remember = (message) => { if (run === state.chatRun) state.history.push(message); }; // not after Clear
  setBusy(controller);
  let reply = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: model || undefined, messages: state.history, stream: true, max_tokens: 512 }),
      signal: controller.signal,
    });
    if (!res.ok) {
      showError(bubble, await errorMessage(res));
      if (run === state.chatRun) state.history.pop();
      return;
    }
    await readStream(res, (t) => { reply += t; bubble.textContent = reply; scrollChat(); });
    bubble.classList.remove("streaming");
    bubble.dataset.done = "1";
    remember({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name === "AbortError") {
      bubble.classList.remove("streaming");
      bubble.append(h("span", { class: "msg-note", text: "stopped" }));
      bubble.dataset.done = "1";
      remember({ role: "assistant", content: reply });
    } else {
      showError(bubble, reply ? `${reply}\n\n— ${e.message}` : e.message === "Failed to fetch" ? "Could not reach this node." : e.message);
      if (run === state.chatRun) state.history.pop();
    }
  } finally {
    setBusy(null);
    $("chat-input").focus();
  }
}

function setupChat() {
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || state.busy) return;
    $("chat-input").value = "";
    send(text);
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-stop").addEventListener("click", () => state.busy && state.busy.abort());
  $("chat-clear").addEventListener("click", () => {
    if (state.busy) state.busy.abort();
    state.chatRun += 1; // the reply in flight no longer belongs to any conversation
    state.history = [];
    $("chat-log").replaceChildren(h("p", { class: "chat-empty muted", id: "chat-empty", text: "Ask the mesh something. Replies stream in through this node's API." }));
  });
  $("chat-model").addEventListener("change", () => state.status && renderAgents(state.status));
}

// ---------------------------------------------------------------- start

// ---------------------------------------------------------------- load and unload (this node's runtime API)

function loadNote(text, bad) {
  const note = $("load-note");
  note.textContent = text;
  note.hidden = !text;
  note.classList.toggle("bad", Boolean(bad));
}

async function runtimeCall(method, path, body) {
  const res = await fetch(path, { method, headers: body ? { "Content-Type": "application/json" } : {}, body: body ? JSON.stringify(body) : undefined });
  let doc = {};
  try { doc = await res.json(); } catch (e) { /* an empty or non-JSON answer */ }
  if (!res.ok) throw new Error((doc.error && doc.error.message) || `HTTP ${res.status}`);
  return doc;
}

function setupRuntime() {
  $("load-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const ref = $("load-ref").value.trim();
    if (!ref) return;
    const button = $("load-btn");
    button.disabled = true;
    loadNote(`Loading ${ref}… (a download shows its progress in the node's terminal)`);
    try {
      const doc = await runtimeCall("POST", "/api/runtime/models", { model: ref });
      loadNote(`${doc.loaded}: ${doc.detail || doc.state}`);
      $("load-ref").value = "";
    } catch (err) {
      loadNote(err.message, true);
    } finally {
      button.disabled = false;
    }
  });
}

async function unloadModel(name, button) {
  button.disabled = true;
  loadNote(`Unloading ${name}: requests in flight finish first…`);
  try {
    await runtimeCall("DELETE", `/api/runtime/models/${encodeURIComponent(name)}`);
    loadNote(`Unloaded ${name}`);
  } catch (err) {
    loadNote(err.message, true);
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupChat();
  setupRuntime();
  $("copy-token").addEventListener("click", (e) => copyText($("join-cmd").textContent, e.currentTarget));
  $("copy-client-token").addEventListener("click", (e) => copyText($("client-join-cmd").textContent, e.currentTarget));
  setInterval(tickLastSeen, 1000);
  follow(); // its first message is the whole status

});
