// The admin dashboard: one EventSource on /dashboard/events, one render per event.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
const HISTORY_LENGTH = 60;
const CODE_NAMES = {
  1000: "normal", 1001: "going away", 1002: "protocol error", 1006: "lost", 1008: "policy",
  1009: "too big", 1011: "internal error", 1012: "service restart", 1013: "try again later",
  1014: "bad gateway",
};

function rate(value) {
  if (value === undefined || value === null) return "0";
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

function bytes(value) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let unit = 0;
  value = value || 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return value.toFixed(unit ? 1 : 0) + " " + units[unit];
}

function milliseconds(seconds) {
  return seconds === null || seconds === undefined ? "-" : (seconds * 1000).toFixed(2) + " ms";
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
  return td;
}

function health(backend) {
  if (backend.available) return ["up", "up"];
  if (backend.ejected) return ["ejected", "down"];
  return ["down", "down"];
}

async function control(button) {
  const row = button.closest("tr");
  const action = row.dataset.running === "true" ? "stop" : "start";
  button.disabled = true;
  try {
    const path = "/dashboard/demo/" + encodeURIComponent(row.dataset.demo) + "/" + action;
    const response = await fetch(path, { method: "POST" });
    button.title = response.ok ? "" : await response.text();
  } finally {
    button.disabled = false;
  }
}

// Tables are built once per set of routes and backends and then updated in place, so
// that a button is never replaced under the pointer while someone clicks it.
let layout = "";

function buildRoutes(routes, demo) {
  const container = $("routes");
  container.replaceChildren();
  for (const route of routes) {
    const title = document.createElement("h3");
    title.textContent = "route " + route.name;
    const table = document.createElement("table");
    table.className = "backends";
    table.dataset.route = route.name;
    const head = table.createTHead().insertRow();
    const columns = ["backend", "health", "connections", "weight", "ring share", "keys now"];
    if (demo) columns.push("demo backend");
    for (const name of columns) {
      const th = document.createElement("th");
      th.textContent = name;
      head.append(th);
    }
    const body = table.createTBody();
    for (const backend of route.backends) {
      const row = body.insertRow();
      row.dataset.backend = backend.backend;
      cell(row, backend.backend, "identity");
      for (const name of ["health", "active", "weight", "ring-share", "key-share"]) cell(row, "", name);
      if (demo) {
        const td = cell(row, "", "demo");
        if (backend.demo) {
          row.dataset.demo = backend.demo.name;
          const label = document.createElement("span");
          label.className = "demo-state";
          const button = document.createElement("button");
          button.type = "button";
          button.addEventListener("click", () => control(button));
          td.append(label, button);
        }
      }
    }
    container.append(title, table);
  }
}

function renderRoutes(routes, demo) {
  const shape = JSON.stringify([demo, routes.map((r) => [r.name, r.backends.map((b) => [b.backend, !!b.demo])])]);
  if (shape !== layout) {
    buildRoutes(routes, demo);
    layout = shape;
  }
  const tables = $("routes").querySelectorAll("table.backends");
  routes.forEach((route, r) => {
    const rows = tables[r].tBodies[0].rows;
    route.backends.forEach((backend, b) => {
      const row = rows[b];
      const [word, className] = health(backend);
      const healthCell = row.querySelector("td.health");
      healthCell.textContent = word;
      healthCell.className = "health " + className;
      row.querySelector("td.active").textContent = String(backend.active_connections);
      row.querySelector("td.weight").textContent = String(backend.weight);
      const share = row.querySelector("td.ring-share");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = (backend.ring_share * 6).toFixed(2) + "rem";
      share.replaceChildren(bar, document.createTextNode((backend.ring_share * 100).toFixed(0) + "%"));
      row.querySelector("td.key-share").textContent = (backend.key_share * 100).toFixed(0) + "%";
      if (backend.demo) {
        const running = backend.demo.running;
        row.dataset.running = String(running);
        row.querySelector(".demo-state").textContent = backend.demo.name + (running ? " running " : " stopped ");
        const button = row.querySelector("button");
        button.className = running ? "demo-stop" : "demo-start";
        button.textContent = running ? "stop" : "start";
      }
    });
  });
}

function closeCode(close) {
  if (close.code === "none") {
    // Lost without a Close frame: a lost backend's clients were told 1014.
    return close.side === "backend" ? "none: backend lost, 1014 to its clients" : "none: " + close.side + " lost";
  }
  return close.code + (CODE_NAMES[close.code] ? " " + CODE_NAMES[close.code] : "");
}

function renderRows(id, rows, columns) {
  const body = $(id);
  body.replaceChildren();
  for (const item of rows) {
    const row = body.insertRow();
    for (const column of columns) cell(row, column(item));
  }
}

function drawChart() {
  const canvas = $("chart");
  const context = canvas.getContext("2d");
  const width = canvas.width;
  const height = canvas.height;
  context.clearRect(0, 0, width, height);
  context.strokeStyle = "#d8dde8";
  context.beginPath();
  context.moveTo(0, height - 0.5);
  context.lineTo(width, height - 0.5);
  context.stroke();
  const series = [["messages", "#2f6fde"], ["connections", "#1f7a4d"]];
  for (const [name, colour] of series) {
    const values = history.map((point) => point[name]);
    const top = Math.max(1, ...values);
    context.strokeStyle = colour;
    context.lineWidth = 2;
    context.beginPath();
    values.forEach((value, i) => {
      const x = (i / (HISTORY_LENGTH - 1)) * width;
      const y = height - 4 - (value / top) * (height - 8);
      if (i === 0) context.moveTo(x, y);
      else context.lineTo(x, y);
    });
    context.stroke();
  }
}

function render(view) {
  const messages = view.messages_per_second || {};
  const sent = view.bytes_per_second || {};
  const inMessages = messages.client_to_backend || 0;
  const outMessages = messages.backend_to_client || 0;
  $("version").textContent = view.version;
  $("config-version").textContent = view.config.version;
  $("loaded-at").textContent = view.config.loaded_at;
  $("connections").textContent = String(view.connections);
  $("handshakes-rate").textContent = rate(view.handshakes_per_second);
  $("messages-rate").textContent = rate(inMessages) + " / " + rate(outMessages);
  $("bytes-rate").textContent = bytes(sent.client_to_backend) + " / " + bytes(sent.backend_to_client);
  $("rtt").textContent = milliseconds(view.heartbeat_rtt.client) + " / " + milliseconds(view.heartbeat_rtt.backend);
  renderRoutes(view.routes, view.demo);
  renderRows("closes", view.recent_closes, [(c) => c.at, closeCode, (c) => c.side, (c) => String(c.count)]);
  const totals = view.reloads.totals;
  $("reload-totals").textContent = (totals.success || 0) + " succeeded, " + (totals.failure || 0) + " refused";
  renderRows("reloads", view.reloads.recent, [(r) => r.at, (r) => r.result, (r) => r.version || "-"]);
  $("workers-section").hidden = view.workers.length < 2;
  renderRows("workers", view.workers, [
    (w) => String(w.index), (w) => String(w.pid), (w) => String(w.restarts),
    (w) => (w.error ? w.error : String(w.connections)),
  ]);
  history.push({ messages: inMessages + outMessages, connections: view.connections });
  while (history.length > HISTORY_LENGTH) history.shift();
  drawChart();
  $("live").textContent = "live, " + view.at;
  document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
}

const feed = new EventSource("/dashboard/events");
feed.onopen = () => $("live").classList.add("on");
feed.onerror = () => {
  $("live").classList.remove("on");
  $("live").textContent = "reconnecting";
};
feed.onmessage = (event) => render(JSON.parse(event.data));
