// nanofleet dashboard: fetches the coordinator's read-only JSON views and draws them.
// Hand-written, no build step. Text from the server only ever goes into textContent or
// attributes, never into HTML, so nothing a node reports can run in this page.
"use strict";

const $ = (selector) => document.querySelector(selector);

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const badge = (state) => el("span", { class: `badge ${state}`, text: String(state).replace("_", " ") });

function ago(ms, now = Date.now()) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ms).toISOString().slice(0, 16).replace("T", " ");
}
const when = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "");
function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log2(n) / 10));
  return `${(n / 2 ** (10 * i)).toFixed(i ? 1 : 0)} ${units[i]}`;
}

class Unauthorized extends Error {}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin", headers: { accept: "application/json" } });
  if (response.status === 401) throw new Unauthorized("session ended");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
  return body;
}

// ---------------------------------------------------------------- login and navigation

function showLogin(message = "") {
  $("#nav").hidden = true;
  $("#who").hidden = true;
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  $("#login-view").hidden = false;
  $("#login-error").textContent = message;
}

async function showApp(user) {
  $("#login-view").hidden = true;
  $("#nav").hidden = false;
  $("#who").hidden = false;
  $("#user").textContent = user;
  await show(location.hash.slice(1) || "fleet");
}

const views = { fleet: loadFleet, rollouts: loadRollouts, federations: loadFederations, audit: loadAudit };

async function show(name) {
  if (!views[name]) name = "fleet";
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `${name}-view`;
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  try {
    await views[name]();
  } catch (error) {
    if (error instanceof Unauthorized) showLogin("Your session ended; log in again.");
    else $(`#${name}-view`).append(el("p", { class: "error", text: error.message }));
  }
}

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#login-error").textContent = "";
  $("#login-submit").disabled = true;
  try {
    const response = await fetch("/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user: $("#login-user").value, password: $("#login-password").value }),
    });
    const body = await response.json().catch(() => ({}));
    $("#login-password").value = "";
    if (!response.ok) {
      $("#login-error").textContent = `Login refused: ${body.error || `HTTP ${response.status}`}`;
      return;
    }
    await showApp(body.user);
  } finally {
    $("#login-submit").disabled = false;
  }
});

$("#logout").addEventListener("click", async () => {
  await fetch("/logout", { method: "POST", credentials: "same-origin" });
  showLogin("Logged out.");
});

for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));

// ---------------------------------------------------------------- fleet

async function loadFleet() {
  const { nodes, now_ms: now } = await api("/api/nodes");
  const counts = {};
  for (const node of nodes) counts[node.status] = (counts[node.status] || 0) + 1;
  $("#fleet-summary").textContent = `${nodes.length} nodes: ` +
    Object.entries(counts).map(([state, n]) => `${n} ${state}`).join(", ");
  const rows = nodes.map((node) => {
    const hardware = [
      node.arch,
      `${node.cpu_cores} cores`,
      `${bytes(node.memory_available_bytes)} free of ${bytes(node.memory_total_bytes)}`,
      ...node.accelerators.map((a) => `${a.kind} ${a.name}${a.memory_bytes ? ` (${bytes(a.memory_bytes)})` : ""}`),
      node.inference_device ? `models on ${node.inference_device}` : null,
      node.power_source === "Battery" ? `battery ${node.battery_percent ?? "?"}%${node.charging ? " charging" : ""}` : null,
    ].filter(Boolean).join(" · ");
    const artifacts = node.artifacts.map((a) => el("div", {},
      `${a.name} ${a.desired || "(none)"}${a.pinned ? " (pinned)" : ""} → ${a.reported || "–"} `,
      a.state ? badge(a.state) : null));
    const labels = Object.entries(node.labels).map(([k, v]) => `${k}=${v}`).join(", ");
    return el("tr", { class: "node", "data-node": node.id },
      el("td", {}, el("div", { text: node.hostname || "(no hostname)" }), el("div", { class: "mono", text: node.id })),
      el("td", {}, badge(node.status), node.revoked_reason ? el("div", { class: "muted", text: node.revoked_reason }) : null),
      el("td", { text: ago(node.last_seen_ms, now), title: when(node.last_seen_ms) }),
      el("td", {}, el("div", { text: node.agent_version }), el("div", { class: "muted", text: node.os })),
      el("td", { text: hardware }),
      el("td", {}, artifacts),
      el("td", { class: "mono", text: labels }));
  });
  $("#fleet-table tbody").replaceChildren(...rows);
}

// ---------------------------------------------------------------- rollouts

function waveRow(wave) {
  const total = wave.nodes.length || 1;
  const count = (states) => wave.nodes.filter((n) => states.includes(n.state)).length;
  const healthy = count(["healthy"]);
  const bad = count(["failed", "rolled_back"]);
  const busy = count(["downloading"]);
  const bar = el("div", { class: "bar", title: `${healthy} healthy, ${busy} downloading, ${bad} failed or rolled back of ${wave.nodes.length}` });
  for (const [cls, n] of [["ok", healthy], ["busy", busy], ["bad", bad]]) {
    const part = el("span", { class: cls });
    part.style.width = `${(100 * n) / total}%`;
    bar.append(part);
  }
  const failures = wave.nodes.filter((n) => n.reason).map((n) => el("div", { class: "error", text: `${n.node_id}: ${n.reason}` }));
  return el("div", { class: "wave", "data-wave": wave.number },
    el("div", {}, `Wave ${wave.number} (${wave.percent}%) `, badge(wave.state)),
    el("div", {}, bar, el("div", { class: "nodes" }, wave.nodes.map((n) => `${n.node_id.slice(0, 8)} ${n.state}`).join(" · ")), failures),
    el("div", { class: "muted", text: `${healthy}/${wave.nodes.length} healthy` }));
}

async function loadRollouts() {
  const { rollouts } = await api("/api/rollouts");
  const cards = rollouts.map((r) => {
    const gate = [
      r.gate.require_smoke ? "smoke prompt" : "no smoke prompt",
      r.gate.max_error_rate > 0 ? `error rate ≤ ${r.gate.max_error_rate}` : null,
      r.gate.max_p95_latency_ms > 0 ? `p95 ≤ ${r.gate.max_p95_latency_ms} ms` : null,
      `wave timeout ${r.gate.wave_timeout_secs} s`,
    ].filter(Boolean).join(", ");
    return el("div", { class: "card rollout", "data-rollout": r.id },
      el("h3", {}, `${r.artifact} `, badge(r.state)),
      el("dl", { class: "facts" },
        el("dt", { text: "Rollout" }), el("dd", { class: "mono", text: r.id }),
        el("dt", { text: "Selector" }), el("dd", { text: r.selector || "(all)" }),
        el("dt", { text: "Gate" }), el("dd", { text: gate }),
        el("dt", { text: "Created" }), el("dd", { text: `${when(r.created_at_ms)} by ${r.created_by}` }),
        r.reason ? [el("dt", { text: "Halted because" }), el("dd", { class: "error", text: r.reason })] : null,
        r.rolled_back.length ? [el("dt", { text: "Rolled back" }), el("dd", { class: "mono", text: r.rolled_back.join(", ") })] : null),
      el("div", { class: "waves" }, r.waves.map(waveRow)));
  });
  $("#rollouts-list").replaceChildren(...(cards.length ? cards : [el("p", { class: "muted", text: "No rollouts yet." })]));
}

// ---------------------------------------------------------------- federations

/** A line plot of one or two series over round numbers, as inline SVG. */
function linePlot({ title, series, yLabel, yMin, yMax, cls }) {
  const W = 420, H = 240, L = 52, R = 14, T = 28, B = 38;
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p.x), ys = all.map((p) => p.y);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = yMin ?? Math.min(...ys), y1 = yMax ?? Math.max(...ys);
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08;
  if (yMin === undefined) y0 -= pad;
  if (yMax === undefined) y1 += pad;
  const sx = (x) => L + (x1 === x0 ? (W - L - R) / 2 : ((x - x0) / (x1 - x0)) * (W - L - R));
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const plot = svg("svg", { class: `plot ${cls}`, width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  plot.append(svg("text", { class: "title", x: L, y: 17 }, title));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    plot.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }));
    plot.append(svg("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, y.toPrecision(3)));
  }
  for (const x of [...new Set(xs)]) {
    plot.append(svg("text", { x: sx(x), y: H - B + 16, "text-anchor": "middle" }, x));
  }
  plot.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  plot.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  plot.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "round"));
  plot.append(svg("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(T + H - B) / 2})` }, yLabel));
  series.forEach((s, i) => {
    const second = i > 0 ? " second" : "";
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
    plot.append(svg("path", { class: `line${second}`, d }));
    for (const p of s.points) {
      plot.append(svg("circle", { class: `point${second}`, cx: sx(p.x), cy: sy(p.y), r: 3.5 },
        svg("title", {}, `${s.name}, round ${p.x}: ${p.y.toFixed(4)}`)));
    }
    if (series.length > 1) {
      plot.append(svg("text", { x: W - R - 4, y: T + 12 + 14 * i, "text-anchor": "end", class: `legend${second}` }, s.name));
    }
  });
  return plot;
}

/** Epsilon spent against the budget, as a bar. */
function budgetBar(spent, budget) {
  const W = 420, H = 46;
  const bar = svg("svg", { class: "plot budget", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "privacy budget" });
  const full = W - 20;
  const share = budget > 0 ? Math.min(1, spent / budget) : 0;
  bar.append(svg("rect", { x: 10, y: 8, width: full, height: 16, fill: "#e6e9ee", rx: 4 }));
  bar.append(svg("rect", { x: 10, y: 8, width: full * share, height: 16, fill: share > 0.9 ? "#c0392b" : "#2b6cb0", rx: 4 }));
  bar.append(svg("text", { x: 10, y: 40 }, budget > 0
    ? `ε spent ${spent.toFixed(3)} of budget ${budget} (${(100 * share).toFixed(0)}%)`
    : `ε spent ${spent.toFixed(3)}; no budget set`));
  return bar;
}

async function loadFederations() {
  const { federations } = await api("/api/federations");
  const cards = federations.map((f) => {
    // The evaluation in round n measures the global adapter entering round n.
    const measured = f.history.filter((r) => r.eval_loss !== null);
    const loss = measured.map((r) => ({ x: r.number, y: r.eval_loss }));
    const exact = measured.map((r) => ({ x: r.number, y: r.eval_exact_match }));
    const trainFirst = f.history.filter((r) => !r.evaluation && r.contributors > 0).map((r) => ({ x: r.number, y: r.train_loss_first }));
    const trainLast = f.history.filter((r) => !r.evaluation && r.contributors > 0).map((r) => ({ x: r.number, y: r.train_loss_last }));
    const plots = el("div", { class: "plots" });
    if (loss.length) {
      plots.append(linePlot({ title: "Held-out loss of the global adapter", series: [{ name: "loss", points: loss }], yLabel: "loss", cls: "loss-plot" }));
      plots.append(linePlot({ title: "Held-out exact match", series: [{ name: "exact match", points: exact }], yLabel: "exact match", yMin: 0, yMax: 1, cls: "exact-plot" }));
    }
    if (trainFirst.length) {
      plots.append(linePlot({ title: "Training loss (first → last step)", series: [{ name: "first step", points: trainFirst }, { name: "last step", points: trainLast }], yLabel: "loss", cls: "train-plot" }));
    }
    const rounds = el("table", { class: "rounds" },
      el("thead", {}, el("tr", {}, ["Round", "State", "Selected", "Reported", "In aggregate", "Held-out loss", "Exact match", "ε", "Finished"].map((h) => el("th", { text: h })))),
      el("tbody", {}, f.history.map((r) => el("tr", {},
        el("td", { text: `${r.number}${r.evaluation ? " (eval)" : ""}` }),
        el("td", {}, badge(r.state), r.reason ? el("div", { class: "muted", text: r.reason }) : null),
        el("td", { text: `${r.selected} of ${r.eligible || "?"}` }),
        el("td", { text: r.reported }),
        el("td", { text: r.contributors }),
        el("td", { text: r.eval_loss === null ? "–" : r.eval_loss.toFixed(4) }),
        el("td", { text: r.eval_exact_match === null ? "–" : r.eval_exact_match.toFixed(3) }),
        el("td", { text: r.epsilon ? r.epsilon.toFixed(3) : "–" }),
        el("td", { text: when(r.finished_ms) })))));
    return el("div", { class: "card federation", "data-federation": f.name },
      el("h3", {}, `${f.name} `, badge(f.state)),
      el("dl", { class: "facts" },
        el("dt", { text: "Base model" }), el("dd", { text: f.base }),
        el("dt", { text: "Adapter" }), el("dd", { text: `rank ${f.rank}, ${f.mode} mode, ${f.secure ? "secure aggregation" : "plaintext aggregation"}` }),
        el("dt", { text: "Rounds" }), el("dd", { text: `${f.global_round} of ${f.rounds} aggregated; ${f.min_clients}–${f.max_clients} clients per round` }),
        el("dt", { text: "Differential privacy" }), el("dd", { text: f.noise_multiplier > 0 ? `noise ×${f.noise_multiplier}${f.distributed_noise ? " (distributed)" : ""}, δ ${f.delta}` : "none" }),
        f.reason ? [el("dt", { text: "Status" }), el("dd", { text: f.reason })] : null),
      budgetBar(f.epsilon_spent, f.epsilon_budget),
      plots,
      rounds);
  });
  $("#federations-list").replaceChildren(...(cards.length ? cards : [el("p", { class: "muted", text: "No federations yet." })]));
}

// ---------------------------------------------------------------- audit trail

const fromHex = (hex) => Uint8Array.from(hex.match(/../g) || [], (h) => parseInt(h, 16));
const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
const concat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
};
const sameBytes = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
const sha256 = async (...parts) => new Uint8Array(await crypto.subtle.digest("SHA-256", concat(...parts)));

/** RFC 6962 leaf hash: SHA-256(0x00 || data). */
const leafHash = (data) => sha256(Uint8Array.of(0), data);
/** RFC 6962 interior node hash: SHA-256(0x01 || left || right). */
const nodeHash = (left, right) => sha256(Uint8Array.of(1), left, right);

/**
 * RFC 9162 section 2.1.3.2, as audit/src/merkle.rs `verify_inclusion`: throws with the
 * reason unless `proof` leads from `leaf` at `index` to `root` in a tree of `size`.
 * Index and size are BigInt (u64).
 */
async function verifyInclusion(leaf, index, size, proof, root) {
  if (index >= size) throw new Error(`leaf index ${index} is outside a tree of size ${size}`);
  let fn = index, sn = size - 1n, r = leaf;
  for (const p of proof) {
    if (sn === 0n) throw new Error("the proof has more hashes than the tree sizes allow");
    if ((fn & 1n) === 1n || fn === sn) {
      r = await nodeHash(p, r);
      while ((fn & 1n) === 0n && fn !== 0n) { fn >>= 1n; sn >>= 1n; }
    } else {
      r = await nodeHash(r, p);
    }
    fn >>= 1n; sn >>= 1n;
  }
  if (sn !== 0n) throw new Error("the proof has fewer hashes than the tree sizes need");
  if (!sameBytes(r, root)) throw new Error("the proof does not lead to the signed root");
}

/** The bytes a tree head signature covers (audit/src/head.rs `canonical_bytes`). */
function treeHeadMessage(size, root, timeMs) {
  const domain = new TextEncoder().encode("nanofleet-audit-tree-head-v1\0");
  const numbers = new DataView(new ArrayBuffer(16));
  numbers.setBigUint64(0, size);
  numbers.setBigInt64(8, timeMs);
  const raw = new Uint8Array(numbers.buffer);
  return concat(domain, raw.slice(0, 8), root, raw.slice(8));
}

async function verifyHeadSignature(head, publicKeyHex) {
  const key = await crypto.subtle.importKey("raw", fromHex(publicKeyHex), { name: "Ed25519" }, false, ["verify"]);
  const message = treeHeadMessage(BigInt(head.size), fromHex(head.root), BigInt(head.time_ms));
  if (!(await crypto.subtle.verify({ name: "Ed25519" }, key, fromHex(head.signature), message))) {
    throw new Error("the tree head signature does not verify with the coordinator's key");
  }
}

/** Decodes an entry's canonical bytes (audit/src/entry.rs), to compare with the row. */
function decodeEntry(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  const need = (n) => { if (at + n > bytes.length) throw new Error("canonical entry bytes end early"); };
  const text = () => {
    need(4);
    const len = view.getUint32(at); at += 4;
    need(len);
    const s = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(at, at + len)); at += len;
    return s;
  };
  need(10);
  if (bytes[0] !== 1) throw new Error(`unknown canonical entry version ${bytes[0]}`);
  const time_ms = Number(view.getBigInt64(1)); at = 9;
  const tag = bytes[at++];
  const actor = tag === 0 ? "coordinator" : tag === 1 ? `node:${text()}` : tag === 2 ? `operator:${text()}` : null;
  if (actor === null) throw new Error(`unknown actor tag ${tag}`);
  const entry = { time_ms, actor, action: text(), subject: text(), details: text() };
  if (at !== bytes.length) throw new Error(`canonical entry bytes have ${bytes.length - at} trailing bytes`);
  return entry;
}

/**
 * Checks that `entry` (as the table shows it) is leaf `entry.index` of the log the
 * coordinator signed: signature on the head, inclusion proof to its root, and the leaf's
 * bytes saying what the row says. Returns the head it checked against.
 */
async function verifyEntry(entry) {
  const head = await api("/api/audit/head");
  pinKey(head.public_key);
  await verifyHeadSignature(head, head.public_key);
  const proof = await api(`/api/audit/proof?index=${entry.index}&size=${head.size}`);
  const leafBytes = fromHex(proof.leaf);
  const decoded = decodeEntry(leafBytes);
  for (const field of ["time_ms", "actor", "action", "subject", "details"]) {
    if (decoded[field] !== entry[field]) throw new Error(`the logged ${field} differs from the row: ${JSON.stringify(decoded[field])}`);
  }
  await verifyInclusion(await leafHash(leafBytes), BigInt(entry.index), BigInt(head.size), proof.proof.map(fromHex), fromHex(head.root));
  return head;
}

/** Trust on first use: remembers the coordinator's log key and warns if it changes. */
function pinKey(publicKeyHex) {
  const pinned = localStorage.getItem("nanofleet-audit-key");
  if (pinned && pinned !== publicKeyHex) {
    throw new Error(`the coordinator's audit key changed from ${pinned} to ${publicKeyHex}; check it against the coordinator's audit-signing.pub`);
  }
  if (!pinned) localStorage.setItem("nanofleet-audit-key", publicKeyHex);
}

function auditQuery() {
  const params = new URLSearchParams();
  const add = (name, value) => { if (value) params.set(name, value); };
  add("text", $("#audit-text").value.trim());
  add("action", $("#audit-action").value.trim());
  add("node", $("#audit-node").value.trim());
  const ms = (input) => (input.value ? String(new Date(input.value).getTime()) : "");
  add("since_ms", ms($("#audit-since")));
  add("until_ms", ms($("#audit-until")));
  return params;
}

async function loadAudit() {
  const params = auditQuery();
  for (const format of ["jsonl", "csv"]) {
    const exportParams = new URLSearchParams(params);
    exportParams.set("format", format);
    $(`#export-${format}`).href = `/api/audit/export?${exportParams}`;
  }
  params.set("limit", "500");
  const [{ entries }, head] = await Promise.all([api(`/api/audit?${params}`), api("/api/audit/head")]);
  $("#audit-head").textContent = `${head.size} entries, root ${head.root.slice(0, 16)}…, signed ${when(head.time_ms)}`;
  $("#audit-key").textContent = `Coordinator log key (ed25519): ${head.public_key}`;
  $("#audit-error").textContent = "";
  const rows = entries.map((entry) => {
    const result = el("span", { class: "result" });
    const button = el("button", {
      class: "small verify", text: "verify",
      onclick: async () => {
        button.disabled = true;
        result.className = "result";
        result.textContent = "checking…";
        try {
          const checked = await verifyEntry(entry);
          result.className = "result verified";
          result.textContent = `verified ✓ (in the signed tree of ${checked.size})`;
        } catch (error) {
          if (error instanceof Unauthorized) return showLogin("Your session ended; log in again.");
          result.className = "result unverified";
          result.textContent = `not verified ✗ ${error.message}`;
        } finally {
          button.disabled = false;
        }
      },
    });
    return el("tr", { class: "entry", "data-index": entry.index },
      el("td", { text: entry.index }),
      el("td", { class: "proof" }, button, " ", result),
      el("td", { class: "time", text: when(entry.time_ms) }),
      el("td", { class: "mono", text: entry.actor }),
      el("td", { class: "mono", text: entry.action }),
      el("td", { class: "mono", text: entry.subject }),
      el("td", { class: "details", text: entry.details }));
  });
  $("#audit-table tbody").replaceChildren(...rows);
}

$("#audit-filter").addEventListener("submit", (event) => {
  event.preventDefault();
  loadAudit().catch((error) => {
    if (error instanceof Unauthorized) showLogin("Your session ended; log in again.");
    else $("#audit-error").textContent = error.message;
  });
});

// ---------------------------------------------------------------- start

api("/api/me").then((me) => showApp(me.user)).catch(() => showLogin());
