// The status page: block coverage per model and per server, from /api/v1/swarm.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function blockBar(numBlocks, covered, title) {
  // One cell per block; covered(i) gives the cell's class.
  const bar = el("div", { class: "blocks", title, style: `grid-template-columns: repeat(${numBlocks}, 1fr)` });
  for (let i = 0; i < numBlocks; i++) bar.append(el("span", { class: covered(i), title: `block ${i}` }));
  return bar;
}

function describePath(server) {
  // How the web app reaches the server: direct, hole-punched, or through a relay.
  const path = server.path || server.reachability;
  return path === "relayed" && server.relay ? `relayed via …${server.relay.slice(-8)}` : path;
}

function describeWeights(server) {
  // How the server holds its weights: "float32", or "int8 (float32)" when quantized (cli/status.py describe_weights).
  const quant = server.quant || "none";
  return quant === "none" ? server.dtype : `${quant} (${server.dtype})`;
}

function describeWire(server) {
  // How the server sends hidden states, and what that measured per token (cli/status.py describe_wire).
  if (server.wire_dtype == null) return "?";
  if (server.wire_bytes_per_token == null) return server.wire_dtype;
  return `${server.wire_dtype}, ${server.wire_bytes_per_token.toFixed(0)} B/token`;
}

function modelSection(model, joinArgs) {
  const section = el("section", { class: "model", "data-model": model.model_id });
  section.append(el("h2", {}, `${model.name} `, el("small", {}, `${model.model_type}, ${model.num_blocks} blocks`)));
  section.append(el("div", { class: "coverage-label" }, "Coverage (online servers per block)"));
  section.append(blockBar(model.num_blocks, (i) => (model.coverage[i] ? `c${Math.min(model.coverage[i], 3)}` : "missing"),
    "coverage"));
  const summary = model.missing
    ? el("p", { class: "missing-blocks" }, `Missing blocks: ${model.missing}. Connect your GPU: molink-swarm join --model ${model.name} ` +
        `--blocks ${model.missing.split(",")[0].trim()} ${joinArgs}`)
    : el("p", { class: "all-covered" }, `All ${model.num_blocks} blocks are served.`);
  section.append(summary);
  const table = el("table", {},
    el("thead", {}, el("tr", {}, ...["Server", "Blocks", "", "State", "Tokens/s/block", "Link tokens/s", "Sessions", "Free cache", "Weights", "Wire", "Path", "RTT"]
      .map((h) => el("th", {}, h)))));
  const body = el("tbody");
  for (const s of model.servers) {
    body.append(el("tr", { class: `server ${s.state}` },
      el("td", { title: s.peer_id }, s.name || `…${s.peer_id.slice(-8)}`),
      el("td", {}, `${s.start}:${s.end}`),
      el("td", { class: "bar-cell" }, blockBar(model.num_blocks, (i) => (i >= s.start && i < s.end ? "held" : ""), `${s.start}:${s.end}`)),
      el("td", { class: `state ${s.state}` }, s.state),
      el("td", { class: "throughput" }, s.batch_throughput == null ? s.throughput.toFixed(0)
        : `${s.throughput.toFixed(0)} (${s.batch_throughput.toFixed(0)} batched)`),
      el("td", { class: "link" }, s.network_throughput == null ? "" : s.network_throughput.toFixed(0)),
      el("td", {}, `${s.active_sessions}/${s.max_sessions}`),
      el("td", {}, s.free_cache_tokens),
      el("td", { class: "weights" }, describeWeights(s)),
      el("td", { class: "wire" }, describeWire(s)),
      el("td", {}, describePath(s)),
      el("td", {}, s.rtt_ms == null ? "unreachable" : `${s.rtt_ms.toFixed(1)} ms`)));
  }
  table.append(body);
  section.append(el("div", { class: "table-wrap" }, table));
  return section;
}

// What this app's spot checks found: servers caught answering wrong outputs (banned by this app).
function spotChecks(byModel) {
  return Object.entries(byModel).filter(([, s]) => s.rate > 0).map(([name, s]) => {
    const caught = Object.entries(s.caught);
    const line = `Spot checks of ${name} (${(100 * s.rate).toFixed(0)}% of steps): ${s.checks} checked, `
      + `${s.disagreements} disagreed, ${caught.length} server(s) caught and banned`;
    return el("div", { class: "spot-checks" }, el("p", {}, line),
      ...caught.map(([peer, why]) => el("p", { class: "missing-blocks" }, `${peer}: ${why}`)));
  });
}

async function refresh() {
  const root = document.getElementById("swarm");
  try {
    const swarm = await (await fetch("/api/v1/swarm")).json();
    root.replaceChildren(...(swarm.models.length
      ? swarm.models.map((m) => modelSection(m, swarm.join_args))
      : [el("p", { class: "missing-blocks" }, "No model is announced in this swarm yet. Start a server: molink-swarm join --model M " + swarm.join_args)]),
      ...spotChecks(swarm.spot_checks || {}));
    document.getElementById("updated").textContent = new Date(swarm.taken_at * 1000).toLocaleTimeString();
  } catch (e) {
    root.replaceChildren(el("p", { class: "error" }, `Could not read the swarm: ${e.message}`));
  }
}

refresh();
setInterval(refresh, 5000);
