// zmqchat's chat page: plain JavaScript against the server's own OpenAI API.
// The conversation lives in this page; every turn sends it whole, streamed back as SSE.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null, lastRequest: null };
window.zmqchat = state; // for tests and the curious

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("zmqchat-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("zmqchat-api-key", keyInput.value);
  loadModels();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function errorText(response) {
  if (response.status === 401) return "This server needs an API key: enter a valid one under Settings.";
  try {
    const body = await response.json();
    return `Error ${response.status}: ${body.error.message}`;
  } catch (e) {
    return `Error ${response.status} from the server.`;
  }
}

// -- rendering: text is escaped first, so a reply can never inject HTML --------------------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(text) {
  return text
    .replace(/`([^`\n]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/\n/g, "<br>");
}

function renderMarkdown(text) {
  // Fenced code blocks, then inline code, bold and line breaks in the prose between them.
  const parts = escapeHtml(text).split(/```/);
  return parts.map((part, i) => {
    if (i % 2 === 1) return `<pre><code>${part.replace(/^[\w+-]*\n/, "")}</code></pre>`;
    return part.split(/\n{2,}/).map((p) => (p.trim() ? `<p>${inline(p)}</p>` : "")).join("");
  }).join("");
}

function addBubble(kind, text) {
  const bubble = document.createElement("div");
  bubble.className = `message ${kind}`;
  bubble.innerHTML = `<div class="content"></div>`;
  bubble.querySelector(".content").innerHTML = kind === "user" ? inline(escapeHtml(text)) : renderMarkdown(text);
  $("conversation").appendChild(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

function addMeta(bubble, text, stats) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.innerHTML = `<span class="stats">${escapeHtml(stats)}</span><button type="button" class="copy">Copy</button>`;
  meta.querySelector(".copy").addEventListener("click", () => copy(text, meta.querySelector(".copy")));
  bubble.appendChild(meta);
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) { // no clipboard API outside secure contexts: the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1200);
}

// -- models and cluster --------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  const response = await fetch("/v1/models", { headers: headers() }).catch(() => null);
  if (!response || !response.ok) {
    select.innerHTML = "<option value=''>no models</option>";
    if (response) addBubble("error", await errorText(response));
    return;
  }
  const current = select.value;
  const names = (await response.json()).data.map((m) => m.id);
  select.innerHTML = names.map((n) => `<option>${escapeHtml(n)}</option>`).join("");
  if (names.includes(current)) select.value = current;
}

async function refreshCluster() {
  const response = await fetch("/v1/cluster", { headers: headers() }).catch(() => null);
  const panel = $("cluster");
  if (!response || !response.ok) {
    panel.textContent = response ? `unavailable (${response.status})` : "server unreachable";
    return;
  }
  const status = await response.json();
  const models = Object.entries(status.models).map(([name, m]) =>
    `<tr><td>${escapeHtml(name)}</td><td>${m.workers}</td><td class="free" data-model="${escapeHtml(name)}">${m.free}/${m.slots}</td><td>${m.queued}</td></tr>`);
  const workers = status.workers.map((w) =>
    `<tr><td>${escapeHtml(w.worker_id)}</td><td>${escapeHtml(w.device)}</td><td>${w.slots - w.free}/${w.slots}</td><td>${w.done}</td></tr>`);
  panel.innerHTML =
    `<table><tr><th>model</th><th>workers</th><th>free</th><th>queued</th></tr>${models.join("")}</table>` +
    `<table><tr><th>worker</th><th>device</th><th>busy</th><th>done</th></tr>${workers.join("")}</table>` +
    `<div>policy: ${escapeHtml(status.policy)}</div>`;
}

// -- a turn --------------------------------------------------------------------------------

function requestBody() {
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push(...state.messages);
  const body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true } };
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  if (number("temperature") !== null) body.temperature = number("temperature");
  if (number("top-p") !== null) body.top_p = number("top-p");
  if (number("max-tokens") !== null) body.max_tokens = number("max-tokens");
  return body;
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  const content = bubble.querySelector(".content");
  setBusy(true);
  state.controller = new AbortController();
  state.lastRequest = requestBody();
  const started = performance.now();
  let reply = "", pieces = 0, firstAt = null, usage = null, failure = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(state.lastRequest), signal: state.controller.signal,
    });
    if (!response.ok) {
      failure = await errorText(response);
    } else {
      for await (const event of serverEvents(response)) {
        if (event.error) { failure = `Error: ${event.error.message}`; break; }
        if (event.usage) usage = event.usage;
        const delta = event.choices && event.choices[0] && event.choices[0].delta.content;
        if (delta) {
          if (firstAt === null) firstAt = performance.now();
          reply += delta;
          pieces += 1;
          content.innerHTML = renderMarkdown(reply);
          bubble.scrollIntoView({ block: "end" });
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") failure = `Error: ${e.message}`;
  }
  const stopped = state.controller.signal.aborted;
  state.controller = null;
  setBusy(false);
  if (failure && !reply) {
    bubble.remove();
    state.messages.pop(); // the turn failed: let the user try again
    addBubble("error", failure);
    return;
  }
  state.messages.push({ role: "assistant", content: reply });
  const seconds = (performance.now() - (firstAt || started)) / 1000;
  const tokens = usage ? usage.completion_tokens : pieces; // a stopped stream has no usage: count pieces
  const stats = [
    firstAt !== null ? `first token ${Math.round(firstAt - started)} ms` : "no output",
    tokens && seconds > 0 ? `${(tokens / seconds).toFixed(1)} tokens/s` : "",
    stopped ? "stopped" : "",
  ].filter(Boolean).join(" · ");
  addMeta(bubble, reply, stats);
  if (failure) addBubble("error", failure);
}

async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

// -- controls ------------------------------------------------------------------------------

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").innerHTML = "";
});
$("toggle-settings").addEventListener("click", (e) => {
  const open = $("settings").classList.toggle("open");
  e.target.setAttribute("aria-expanded", String(open));
});

loadModels();
refreshCluster();
setInterval(refreshCluster, 3000);
