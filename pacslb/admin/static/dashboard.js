// The pacslb dashboard: polls the admin API and draws what it says. It owns no state of its own beyond
// the token (kept in this tab's sessionStorage) and the events it has already shown. With admin.token_file
// every API request needs the token, reads included: the page asks for it when the API answers 401.
"use strict";

const STATUS_EVERY_MS = 2000; // the page is never more than ~2 s behind the balancer
const HISTORY_EVERY_MS = 5000; // the balancer samples throughput every 5 s; polling faster shows nothing new
const REQUEST_TIMEOUT_MS = 4000; // a request slower than this counts as the balancer not answering
const MAX_EVENTS_SHOWN = 100;
const SPARK_W = 132;
const SPARK_H = 30;
const SPARK_MIN_SPAN = 120; // seconds: the first minutes of data are not squeezed into one spike at the right edge

const ACTIONS = ["online", "drain", "halt"];
const EXPLAIN = {
  drain: "New clients go to other nodes. Clients pinned to it by persistence still reach it, and connections in progress run to their end.",
  halt: "It takes no connection at all, its persistence entries are dropped, and connections in progress are closed after the halt grace",
  online: "It takes new clients again.",
};

let token = sessionStorage.getItem("pacslb-token") || "";
let lastEvent = 0;
let events = [];
let status = null;
let history = { series: {}, window: 3600 };
let failures = 0;
let tokenWaiters = []; // what to do again once the token dialog is answered
let tokenDeclined = false; // the operator cancelled the dialog: ask again only when they press Token

// -- small helpers --------------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
}

function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, (Date.now() / 1000) - ts);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

function toast(message, isError) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.className = "toast" + (isError ? " error" : "");
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, isError ? 8000 : 4000);
}

async function api(method, path, body) {
  // X-Pacslb-Request: the API refuses a change without it (or a JSON body), so that no form or simple
  // request from a page elsewhere can make one (pacslb/admin/guard.py).
  const headers = { Accept: "application/json", "X-Pacslb-Request": "1" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  try {
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      signal: controller.signal, cache: "no-store",
    });
    const data = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, data };
  } finally {
    clearTimeout(timer);
  }
}

// -- drawing --------------------------------------------------------------------------------------------

function pill(state, testid) {
  return el("span", { class: `pill ${state}`, "data-testid": testid }, state);
}

function setLive(ok, why) {
  const live = document.getElementById("live");
  live.dataset.state = ok ? "ok" : "lost";
  document.getElementById("live-text").textContent = ok
    ? `live · updated ${new Date().toLocaleTimeString([], { hour12: false })}`
    : why || "connection to pacslb lost: retrying";
}

function drawSummary() {
  const services = status.services;
  const down = services.filter((s) => s.state === "down");
  const nodes = status.nodes;
  const nodesUp = nodes.filter((n) => n.health === "up").length;
  const active = services.reduce((sum, s) => sum + s.active, 0);
  let rate = 0;
  for (const series of Object.values(history.series)) {
    const n = series.t.length;
    if (n) rate += series.up[n - 1] + series.down[n - 1];
  }
  const out = document.getElementById("summary");
  out.replaceChildren(
    el("div", { class: "card" + (down.length ? " bad" : ""), "data-testid": "summary-services" },
      el("div", { class: "label" }, "Services usable"),
      el("div", { class: "value" }, `${services.length - down.length} / ${services.length}`),
      el("div", { class: "detail" }, down.length ? `no usable server: ${down.map((s) => s.name).join(", ")}` : "every service has a usable server")),
    el("div", { class: "card" + (nodesUp < nodes.length ? " bad" : "") },
      el("div", { class: "label" }, "Nodes up"),
      el("div", { class: "value" }, `${nodesUp} / ${nodes.length}`),
      el("div", { class: "detail" }, nodes.filter((n) => n.admin !== "online").map((n) => `${n.name}: ${n.admin}`).join(", ") || "all online")),
    el("div", { class: "card" },
      el("div", { class: "label" }, "Open connections"),
      el("div", { class: "value" }, active),
      el("div", { class: "detail" }, `${services.reduce((sum, s) => sum + s.total, 0)} since start`)),
    el("div", { class: "card" },
      el("div", { class: "label" }, "Throughput"),
      el("div", { class: "value" }, `${bytes(rate)}/s`),
      el("div", { class: "detail" }, "both ways, last 5 s, ended connections")),
    ...[roleCard()].filter(Boolean),
  );
}

// The role keepalived last reported (a clustered pair, docs/high-availability.md); no card for a balancer
// that is on its own and was never told one.
const ROLE_MEANING = {
  master: "holds the virtual IP",
  backup: "stands by: the peer holds the virtual IP",
  fault: "cannot hold the virtual IP: a check failed",
  stopped: "keepalived stopped on this balancer",
  unknown: "keepalived has not reported yet",
};

function roleCard() {
  const role = status.role || "unknown";
  if (role === "unknown" && !status.vrrp) return null;
  return el("div", { class: "card" + (role === "fault" || role === "stopped" ? " bad" : ""), "data-testid": "summary-role" },
    el("div", { class: "label" }, "Cluster role"),
    el("div", { class: "value" }, role),
    el("div", { class: "detail" }, ROLE_MEANING[role] + (status.role_since ? `, since ${ago(status.role_since)}` : "")));
}

function actionButtons(node, service, current) {
  return el("div", { class: "btns" }, ACTIONS.map((action) => el("button", {
    type: "button",
    class: `act-${action}`,
    "data-action": action,
    "data-node": node,
    "data-service": service || null,
    disabled: current === action,
    title: `${action} ${node}${service ? ` in ${service}` : " in every service"}`,
    onclick: () => confirmAction(node, action, service),
  }, action[0].toUpperCase() + action.slice(1))));
}

function drawNodes() {
  const tbody = document.querySelector("#nodes tbody");
  const rows = status.nodes.map((node) => {
    const chips = node.services.map((name) => {
      const service = status.services.find((s) => s.name === name);
      const server = service.servers.find((s) => s.name === node.name);
      const state = server.health === "down" ? "down" : server.admin === "online" ? "up" : server.admin;
      return el("span", { class: "chip", title: `${name}: ${server.health}, ${server.admin}` },
        el("span", { class: `dot ${state}` }), name);
    });
    const skew = node.clock_skew === null ? el("span", { class: "note" }, "ok")
      : el("span", { class: "note warn" }, `${node.clock_skew > 0 ? "+" : ""}${node.clock_skew.toFixed(1)} s`);
    return el("tr", { "data-testid": `node-${node.name}` },
      el("td", { class: "name" }, node.name, " ", pill(node.health, `node-health-${node.name}`)),
      el("td", {}, el("div", { class: "chips" }, chips)),
      el("td", {}, pill(node.admin, `node-admin-${node.name}`)),
      el("td", {}, skew),
      el("td", { class: "actions-col" }, actionButtons(node.name, null, node.admin)));
  });
  tbody.replaceChildren(...rows);
}

function sparkline(key) {
  const series = history.series[key];
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", SPARK_W);
  svg.setAttribute("height", SPARK_H);
  svg.setAttribute("viewBox", `0 0 ${SPARK_W} ${SPARK_H}`);
  let text = "–";
  if (series && series.t.length) {
    // The x axis spans the data there is (at least SPARK_MIN_SPAN), up to the hour the balancer keeps.
    const now = series.t[series.t.length - 1];
    const span = Math.min(history.window, Math.max(SPARK_MIN_SPAN, now - series.t[0]));
    const start = now - span;
    const top = Math.max(1, ...series.up, ...series.down);
    for (const [values, color] of [[series.down, "var(--to-client)"], [series.up, "var(--to-server)"]]) {
      const points = series.t.map((t, i) => {
        const x = ((t - start) / span) * (SPARK_W - 2) + 1;
        const y = SPARK_H - 2 - (values[i] / top) * (SPARK_H - 4);
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      });
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("points", points.join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", color);
      line.setAttribute("stroke-width", "1.5");
      svg.append(line);
    }
    const last = series.t.length - 1;
    text = `${bytes(series.up[last] + series.down[last])}/s`;
    svg.append(Object.assign(document.createElementNS("http://www.w3.org/2000/svg", "title"),
      { textContent: `last ${Math.round(span / 60)} min; peak ${bytes(top)}/s; to clients blue, to the node orange` }));
  }
  return el("div", { class: "spark" }, svg, el("span", { class: "rate" }, text));
}

function checkCell(server) {
  const check = server.check;
  if (!check) return el("span", { class: "note" }, "no check");
  const ms = check.duration === null ? "" : ` · ${(check.duration * 1000).toFixed(0)} ms`;
  return el("span", { class: check.ok === false ? "note warn" : "note", title: check.type },
    `${check.reason}${ms} · ${ago(check.at)}`);
}

function drawServices() {
  const box = document.getElementById("services");
  const panels = status.services.map((service) => {
    const rows = service.servers.map((server) => {
      const health = el("span", {}, pill(server.health, `health-${service.name}-${server.name}`),
        server.down_via ? el("span", { class: "note" }, ` via ${server.down_via}`) : null);
      const admin = el("span", {}, pill(server.admin, `admin-${service.name}-${server.name}`),
        server.halt_closes_in !== null && server.active
          ? el("span", { class: "note" }, ` closing in ${server.halt_closes_in.toFixed(0)} s`) : null);
      return el("tr", { "data-testid": `server-${service.name}-${server.name}` },
        el("td", { class: "name" }, server.name),
        el("td", { class: "addr" }, server.address),
        el("td", {}, health),
        el("td", {}, admin),
        el("td", { class: "num" }, server.weight),
        el("td", { class: "num" }, server.active),
        el("td", { class: "num" }, server.total),
        el("td", {}, sparkline(`${service.name}/${server.name}`)),
        el("td", {}, checkCell(server)),
        el("td", { class: "actions-col" }, actionButtons(server.name, service.name, server.admin)));
    });
    const rejected = Object.entries(service.rejections).map(([k, v]) => `${k} ${v}`).join(", ");
    const facts = [
      `${service.mode} on ${service.listen}`, service.balance,
      service.persistence === "none" ? "no persistence" : `${service.persistence} persistence (${service.persistence_entries} entries)`,
      `${service.active} open / ${service.total} total`,
    ];
    if (rejected) facts.push(`turned away: ${rejected}`);
    return el("section", { class: "panel" + (service.state === "down" ? " service-down" : ""), "data-testid": `service-${service.name}` },
      el("div", { class: "panel-head" },
        el("h2", {}, service.name), pill(service.state, `service-state-${service.name}`),
        el("p", { class: "facts" }, facts.join(" · "))),
      el("table", { class: "grid" },
        el("thead", {}, el("tr", {},
          ["Server", "Address", "Health", "Admin", "Weight", "Active", "Total"].map((h) => el("th", {}, h)),
          el("th", {}, "Throughput (up to 1 h)",
            el("span", { class: "legend" }, el("span", { class: "sw", style: "background: var(--to-client)" }), "to clients",
              el("span", { class: "sw", style: "background: var(--to-server)" }), "to node")),
          el("th", {}, "Last check"),
          el("th", { class: "actions-col" }, "Actions"))),
        el("tbody", {}, rows)));
  });
  box.replaceChildren(...panels);
}

function drawEvents() {
  const list = document.getElementById("events");
  if (!events.length) {
    list.replaceChildren(el("li", {}, el("span", { class: "empty" }, "nothing has happened yet")));
    return;
  }
  list.replaceChildren(...events.slice().reverse().map((e) => el("li", { "data-kind": e.kind },
    el("time", { datetime: new Date(e.at * 1000).toISOString() }, clock(e.at)),
    el("span", { class: `lvl ${e.level}`, title: e.level }),
    el("span", {}, e.message))));
}

function draw() {
  if (!status) return;
  document.getElementById("subtitle").textContent =
    `${status.config || "demo"} · version ${status.version}`;
  drawSummary();
  drawNodes();
  drawServices();
  drawEvents();
  document.getElementById("foot").textContent =
    `Started ${ago(status.started_at)}` + (status.reloaded_at ? ` · config reloaded ${ago(status.reloaded_at)}` : "") +
    (status.fate_sharing ? " · fate sharing on" : "") + ` · halt grace ${status.halt_grace} s`;
}

// -- actions --------------------------------------------------------------------------------------------

function confirmAction(node, action, service) {
  const dialog = document.getElementById("confirm");
  const where = service ? `in ${service}` : "in every service";
  document.getElementById("confirm-title").textContent = `${action[0].toUpperCase() + action.slice(1)} ${node} ${where}?`;
  let text = EXPLAIN[action];
  if (action === "halt") text += ` (${status ? status.halt_grace : "?"} s).`;
  const orphaned = action === "online" ? [] : lastUsable(node, service);
  if (orphaned.length) text += ` Warning: ${orphaned.join(", ")} would be left with no server for new clients.`;
  document.getElementById("confirm-text").textContent = text;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = action[0].toUpperCase() + action.slice(1);
  ok.className = `primary ${action}`;
  dialog.returnValue = "";
  dialog.onclose = () => { if (dialog.returnValue === "ok") act(node, action, service); };
  dialog.showModal();
}

// The services in which ``node`` is the only server that can take a new client.
function lastUsable(node, service) {
  if (!status) return [];
  const usable = (s) => s.health === "up" && s.admin === "online" && s.weight > 0;
  return status.services
    .filter((svc) => !service || svc.name === service)
    .filter((svc) => {
      const mine = svc.servers.find((s) => s.name === node);
      return mine && usable(mine) && svc.servers.filter(usable).length === 1;
    })
    .map((svc) => svc.name);
}

async function act(node, action, service) {
  const path = service
    ? `/api/v1/services/${encodeURIComponent(service)}/servers/${encodeURIComponent(node)}/${action}`
    : `/api/v1/nodes/${encodeURIComponent(node)}/${action}`;
  let result;
  try {
    result = await api("POST", path);
  } catch (err) {
    toast(`${action} ${node}: pacslb did not answer`, true);
    return;
  }
  if (result.status === 401) {
    askToken(() => act(node, action, service));
    return;
  }
  if (!result.ok) {
    toast(`${action} ${node}: ${result.data.detail || `HTTP ${result.status}`}`, true);
    return;
  }
  toast(result.data.message);
  await refresh();
}

// Ask for the token once, however many requests were refused meanwhile (the status poll goes on while
// the dialog is open); each of them is made again once it is given.
function askToken(then) {
  const dialog = document.getElementById("token-dialog");
  if (then && !tokenWaiters.includes(then)) tokenWaiters.push(then);
  if (dialog.open) return;
  const input = document.getElementById("token-input");
  input.value = token;
  dialog.returnValue = "";
  dialog.onclose = () => {
    const waiting = tokenWaiters;
    tokenWaiters = [];
    if (dialog.returnValue !== "ok") {
      tokenDeclined = true;
      return;
    }
    tokenDeclined = false;
    token = input.value.trim();
    sessionStorage.setItem("pacslb-token", token);
    for (const again of waiting) again();
  };
  dialog.showModal();
}

// -- polling --------------------------------------------------------------------------------------------

async function refresh() {
  try {
    const result = await api("GET", "/api/v1/status");
    if (result.status === 401) {
      setLive(false, "this balancer needs its admin token (press Token)");
      if (!tokenDeclined) askToken(refreshAll);
      return;
    }
    if (!result.ok) throw new Error(`HTTP ${result.status}`);
    status = result.data;
    if (status.last_event !== lastEvent) {
      const more = await api("GET", `/api/v1/events?after=${lastEvent}`);
      if (more.ok) {
        events = events.concat(more.data.events).slice(-MAX_EVENTS_SHOWN);
        if (events.length) lastEvent = events[events.length - 1].id;
      }
    }
    failures = 0;
    setLive(true);
    draw();
  } catch (err) {
    failures++;
    setLive(false);
  }
}

async function refreshHistory() {
  try {
    const result = await api("GET", "/api/v1/history");
    if (result.ok) history = result.data;
  } catch (err) {
    // the status poll reports a lost connection
  }
}

async function refreshAll() {
  await refreshHistory();
  await refresh();
}

async function loop(fn, every) {
  for (;;) {
    const started = Date.now();
    await fn();
    await new Promise((resolve) => setTimeout(resolve, Math.max(200, every - (Date.now() - started))));
  }
}

document.getElementById("token-button").addEventListener("click", () => {
  tokenDeclined = false;
  askToken(refresh);
});
refreshHistory().then(() => {
  loop(refresh, STATUS_EVERY_MS);
  setTimeout(() => loop(refreshHistory, HISTORY_EVERY_MS), HISTORY_EVERY_MS);
});
