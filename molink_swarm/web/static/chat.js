// The chat page: talks to the OpenAI-compatible API of this app; the conversation stays in this browser.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "molink-swarm.chat";
const state = { messages: [], controller: null, models: [] };

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    state.messages = Array.isArray(saved.messages) ? saved.messages : [];
    for (const [id, key] of [["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"]]) {
      if (saved[key] !== undefined) $(id).value = saved[key];
    }
    state.savedModel = saved.model;
  } catch (e) {
    state.messages = [];
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify({
    messages: state.messages,
    model: $("model").value,
    temperature: $("temperature").value,
    top_p: $("top-p").value,
    max_tokens: $("max-tokens").value,
  }));
}

function bubble(role, text, status) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.dataset.state = status || "done";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;  // model output is text, never HTML
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function render() {
  $("messages").replaceChildren();
  if (!state.messages.length) {
    const hint = document.createElement("p");
    hint.className = "muted hint";
    hint.textContent = "Every answer is computed by a chain of peers, each holding a slice of the model.";
    $("messages").appendChild(hint);
  }
  for (const m of state.messages) bubble(m.role, m.content, m.state);
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("prompt").disabled = on;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  render();
  const history = state.messages.map(({ role, content }) => ({ role, content }));
  const reply = { role: "assistant", content: "", state: "streaming" };
  const div = bubble("assistant", "", "streaming");
  const body = div.querySelector(".text");
  let chunks = 0;
  state.controller = new AbortController();
  busy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: state.controller.signal,
      body: JSON.stringify({
        model: $("model").value,
        messages: history,
        stream: true,
        temperature: Number($("temperature").value),
        top_p: Number($("top-p").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new Error(parsed.error.message);
        const delta = parsed.choices && parsed.choices[0] && parsed.choices[0].delta;
        if (delta && delta.content) {
          reply.content += delta.content;
          body.textContent = reply.content;
          div.dataset.chunks = String(++chunks);
          div.scrollIntoView({ block: "end" });
        }
      }
    }
    reply.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      reply.state = "stopped";
    } else {
      reply.state = "error";
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = e.message;
      div.appendChild(err);
    }
  } finally {
    div.dataset.state = reply.state;
    if (reply.state !== "error") state.messages.push(reply);
    else state.messages.pop();  // let the visitor retry the same question
    state.controller = null;
    busy(false);
    save();
    $("prompt").focus();
  }
}

async function loadModels() {
  const response = await fetch("/v1/models");
  const models = (await response.json()).data || [];
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (state.savedModel && models.some((m) => m.id === state.savedModel)) select.value = state.savedModel;
}

function listOtherModels(swarm) {
  // Models the swarm serves that this app has not loaded: shown, but not selectable.
  const select = $("model");
  for (const m of swarm.models) {
    if (m.served_here_as || [...select.options].some((o) => o.dataset.modelId === m.model_id)) continue;
    const option = new Option(`${m.name} (in the swarm, not served by this app)`, "");
    option.disabled = true;
    option.dataset.modelId = m.model_id;
    select.appendChild(option);
  }
}

async function checkCoverage() {
  try {
    const swarm = await (await fetch("/api/v1/swarm")).json();
    const chosen = $("model").value;
    const model = swarm.models.find((m) => m.served_here_as === chosen);
    listOtherModels(swarm);
    const banner = $("banner");
    if (!model) {
      const served = swarm.served_models.find((m) => m.name === chosen);
      banner.textContent = `No server holds ${chosen} yet. Connect your GPU: molink-swarm join --model ${chosen} ` +
        `--blocks 0:${served ? served.num_blocks : "N"} ${swarm.join_args}`;
      banner.hidden = false;
    } else if (model.missing) {
      const first = model.missing.split(",")[0].trim();
      banner.textContent = `The swarm lacks blocks ${model.missing} of ${chosen}, so answers cannot be computed. ` +
        `Connect your GPU: molink-swarm join --model ${chosen} --blocks ${first} ${swarm.join_args}`;
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
  } catch (e) {
    // the status look-up is advisory; the chat still reports real errors
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  save();
  render();
});
$("model").addEventListener("change", () => { save(); checkCoverage(); });
for (const id of ["temperature", "top-p", "max-tokens"]) $(id).addEventListener("change", save);

load();
render();
loadModels().then(checkCoverage);
setInterval(checkCoverage, 10000);
