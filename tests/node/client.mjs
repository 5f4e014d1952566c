// A Node `ws` client for wsgate's end-to-end tests.
//
//   node client.mjs URL [deflate|plain]
//
// Commands arrive as JSON lines on stdin, results leave as JSON lines on stdout:
//   {"op": "send", "kind": "text", "data": STRING}        -> (echoes arrive as "message" events)
//   {"op": "send", "kind": "binary", "data": BASE64}
//   ("compress": false in a send keeps that message uncompressed on a deflate connection)
//   {"op": "ping", "data": BASE64}                        -> {"event": "pong", "data": BASE64}
//   {"op": "close", "code": N, "reason": STRING}          -> {"event": "close", ...}
// Events: open, message {kind, data}, pong {data}, close {code, reason}, error {message}.
// The process exits after "close" or "error", and when stdin closes.
import { createInterface } from "node:readline";
import WebSocket from "ws";

const [url, compression = "plain"] = process.argv.slice(2);

function emit(event, exitCode) {
  const line = JSON.stringify(event) + "\n";
  process.stdout.write(line, exitCode === undefined ? undefined : () => process.exit(exitCode));
}

const ws = new WebSocket(url, { perMessageDeflate: compression === "deflate" });

ws.on("open", () => emit({ event: "open", extensions: ws.extensions }));
ws.on("message", (data, isBinary) =>
  emit({
    event: "message",
    kind: isBinary ? "binary" : "text",
    data: isBinary ? data.toString("base64") : data.toString("utf8"),
  }),
);
ws.on("pong", (data) => emit({ event: "pong", data: data.toString("base64") }));
ws.on("close", (code, reason) => emit({ event: "close", code, reason: reason.toString("utf8") }, 0));
ws.on("error", (err) => emit({ event: "error", message: String(err) }, 1));

const commands = createInterface({ input: process.stdin, crlfDelay: Infinity });
commands.on("line", (line) => {
  const command = JSON.parse(line);
  switch (command.op) {
    case "send": {
      const compress = command.compress !== false;
      if (command.kind === "binary") ws.send(Buffer.from(command.data, "base64"), { binary: true, compress });
      else ws.send(command.data, { binary: false, compress });
      break;
    }
    case "ping":
      ws.ping(Buffer.from(command.data, "base64"));
      break;
    case "close":
      ws.close(command.code, command.reason);
      break;
    default:
      emit({ event: "error", message: `unknown op ${command.op}` }, 1);
  }
});
// The test is gone or done: never outlive it.
commands.on("close", () => {
  ws.terminate();
  process.exit(0);
});
