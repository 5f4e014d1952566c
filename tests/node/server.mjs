// A Node `ws` echo server for wsgate's end-to-end tests.
//
//   node server.mjs [deflate|plain]
//
// Listens on 127.0.0.1, port 0, and reports JSON lines on stdout:
//   {"event": "listening", "port": N}
//   {"event": "connection", "url": PATH, "headers": {...}}
//   {"event": "message", "kind": "text"|"binary", "size": BYTES}   (then echoes it)
//   {"event": "pong", "data": BASE64}
//   {"event": "close", "code": N, "reason": STRING}
// Commands arrive as JSON lines on stdin, each applied to every open connection:
//   {"op": "ping", "data": BASE64}
//   {"op": "close", "code": N, "reason": STRING}
// The process exits when stdin closes.
import { createInterface } from "node:readline";
import { WebSocketServer } from "ws";

const [compression = "plain"] = process.argv.slice(2);

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

const server = new WebSocketServer({
  host: "127.0.0.1",
  port: 0,
  perMessageDeflate: compression === "deflate",
});

server.on("listening", () => emit({ event: "listening", port: server.address().port }));
server.on("connection", (ws, request) => {
  emit({ event: "connection", url: request.url, headers: request.headers });
  ws.on("message", (data, isBinary) => {
    emit({ event: "message", kind: isBinary ? "binary" : "text", size: data.length });
    ws.send(data, { binary: isBinary });
  });
  ws.on("pong", (data) => emit({ event: "pong", data: data.toString("base64") }));
  ws.on("close", (code, reason) => emit({ event: "close", code, reason: reason.toString("utf8") }));
  ws.on("error", (err) => emit({ event: "error", message: String(err) }));
});
server.on("error", (err) => {
  emit({ event: "error", message: String(err) });
  process.exit(1);
});

const commands = createInterface({ input: process.stdin, crlfDelay: Infinity });
commands.on("line", (line) => {
  const command = JSON.parse(line);
  if (command.op === "ping") {
    for (const ws of server.clients) ws.ping(Buffer.from(command.data, "base64"));
  } else if (command.op === "close") {
    for (const ws of server.clients) ws.close(command.code, command.reason);
  } else {
    emit({ event: "error", message: `unknown op ${command.op}` });
  }
});
// The test is gone or done: never outlive it.
commands.on("close", () => {
  for (const ws of server.clients) ws.terminate();
  process.exit(0);
});
