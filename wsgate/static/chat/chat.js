// The demo chat page: one WebSocket to the gateway, pinned to a backend by its room.
// It reconnects after the closes that mean "try again" with exponential backoff and
// full jitter: the wait is random between 0 and min(cap, base * 2^attempt).
"use strict";

const RETRY_CODES = new Set([1001, 1006, 1011, 1012, 1013, 1014]);
const CODE_NAMES = {
  1000: "normal closure", 1001: "going away", 1006: "connection lost", 1008: "policy violation",
  1009: "message too big", 1011: "internal error", 1012: "service restart",
  1013: "try again later", 1014: "bad gateway",
};
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 10000;
const LOG_LIMIT = 200;

const params = new URLSearchParams(location.search);
const room = (params.get("room") || "lobby").slice(0, 64);
const clientId = Math.random().toString(36).slice(2, 10);
const nick = "guest-" + clientId.slice(0, 4);
const $ = (id) => document.getElementById(id);

let socket = null;
let attempt = 0;
let sequence = 0;
let retryTimer = null;

function setState(state) {
  document.body.dataset.state = state;
  $("state").textContent = state;
}

function logEvent(text, bad) {
  const item = document.createElement("li");
  item.textContent = new Date().toLocaleTimeString() + " " + text;
  if (bad) item.className = "bad";
  const events = $("events");
  events.prepend(item);
  while (events.children.length > LOG_LIMIT) events.lastChild.remove();
}

function showMessage(envelope) {
  let said;
  try {
    said = JSON.parse(envelope.data);
  } catch (error) {
    said = { from: "?", text: String(envelope.data) };
  }
  const item = document.createElement("li");
  item.className = "message";
  item.dataset.backend = envelope.backend;
  item.dataset.text = said.text;
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = said.from;
  const meta = document.createElement("span");
  meta.className = "meta";
  let note = "via " + envelope.backend;
  if (said.id && said.id.startsWith(clientId + "-") && typeof said.sent === "number") {
    const rtt = performance.now() - said.sent;
    item.dataset.rtt = rtt.toFixed(1);
    note += ", round trip " + rtt.toFixed(1) + " ms";
  }
  meta.textContent = note;
  item.append(from, document.createTextNode(said.text), meta);
  const messages = $("messages");
  messages.append(item);
  while (messages.children.length > LOG_LIMIT) messages.firstChild.remove();
  messages.scrollTop = messages.scrollHeight;
}

function connect() {
  retryTimer = null;
  $("wait").textContent = "-";
  setState("connecting");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = scheme + "//" + location.host + "/chat?room=" + encodeURIComponent(room);
  const ws = new WebSocket(url);
  socket = ws;
  ws.onopen = () => {
    attempt = 0;
    setState("open");
  };
  ws.onmessage = (event) => {
    let envelope;
    try {
      envelope = JSON.parse(event.data);
    } catch (error) {
      return;
    }
    if (envelope.type === "hello") {
      $("backend").textContent = envelope.backend;
      document.body.dataset.backend = envelope.backend;
      logEvent("connected: room " + envelope.room + " is served by " + envelope.backend);
    } else if (envelope.type === "message") {
      showMessage(envelope);
    }
  };
  ws.onclose = (event) => {
    if (socket !== ws) return;
    socket = null;
    const name = CODE_NAMES[event.code] || "";
    $("close-code").textContent = event.code + (name ? " (" + name + ")" : "");
    document.body.dataset.closeCode = String(event.code);
    $("backend").textContent = "-";
    if (!RETRY_CODES.has(event.code)) {
      setState("closed");
      logEvent("closed " + event.code + (name ? " " + name : "") + "; reload the page to connect again", true);
      return;
    }
    const wait = Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
    attempt += 1;
    setState("waiting");
    $("wait").textContent = (wait / 1000).toFixed(2) + " s (attempt " + attempt + ")";
    logEvent("closed " + event.code + (name ? " " + name : "") + "; reconnecting in "
      + (wait / 1000).toFixed(2) + " s", true);
    retryTimer = setTimeout(connect, wait);
  };
}

$("room").textContent = room;
$("room-input").value = room;
$("nick").textContent = nick;
$("say-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("say").value.trim();
  if (!text || socket === null || socket.readyState !== WebSocket.OPEN) return;
  sequence += 1;
  socket.send(JSON.stringify({ id: clientId + "-" + sequence, from: nick, text, sent: performance.now() }));
  $("say").value = "";
});
$("room-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const next = $("room-input").value.trim() || "lobby";
  location.search = "?room=" + encodeURIComponent(next);
});
connect();
