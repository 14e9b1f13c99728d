#!/usr/bin/env node
// Development server: serves dist/ (index.html for app routes, with the production CSP) and
// translates gRPC-Web to gRPC for an admin listener that does not speak gRPC-Web itself.
// Usage: node tools/dev-server.mjs [--port 5173] [--admin http://127.0.0.1:50052]
// Production serving is the admin listener's job (tonic-web + the three embedded files).
import { readFileSync } from "node:fs";
import http from "node:http";
import http2 from "node:http2";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const args = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const port = Number(arg("--port", "5173"));
const admin = arg("--admin", "http://127.0.0.1:50052");
const dist = join(dirname(fileURLToPath(import.meta.url)), "..", "dist");
const CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const TYPES = { "app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html; charset=utf-8" };

let session;
function upstream() {
  if (!session || session.closed || session.destroyed) session = http2.connect(admin);
  return session;
}

function trailerFrame(fields) {
  const text = Object.entries(fields)
    .map(([k, v]) => `${k}:${v}\r\n`)
    .join("");
  const body = Buffer.from(text);
  const head = Buffer.alloc(5);
  head[0] = 0x80;
  head.writeUInt32BE(body.length, 1);
  return Buffer.concat([head, body]);
}

function grpcWeb(req, res) {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const headers = { ":method": "POST", ":path": req.url, "content-type": "application/grpc", te: "trailers" };
    if (req.headers.authorization) headers.authorization = req.headers.authorization;
    const up = upstream().request(headers);
    const data = [];
    let status = {};
    let trailers = {};
    up.on("response", (h) => (status = h));
    up.on("data", (c) => data.push(c));
    up.on("trailers", (t) => (trailers = t));
    up.on("error", (e) => {
      res.writeHead(200, { "content-type": "application/grpc-web+proto" });
      res.end(trailerFrame({ "grpc-status": "14", "grpc-message": encodeURIComponent(String(e.message)) }));
    });
    up.on("end", () => {
      const src = trailers["grpc-status"] !== undefined ? trailers : status;
      const fields = { "grpc-status": src["grpc-status"] ?? "2" };
      if (src["grpc-message"]) fields["grpc-message"] = src["grpc-message"];
      res.writeHead(200, { "content-type": "application/grpc-web+proto" });
      res.end(Buffer.concat([...data, trailerFrame(fields)]));
    });
    up.end(Buffer.concat(chunks));
  });
}

http
  .createServer((req, res) => {
    if (req.method === "POST" && (req.headers["content-type"] || "").startsWith("application/grpc-web")) return grpcWeb(req, res);
    const name = req.url === "/app.js" ? "app.js" : req.url === "/app.css" ? "app.css" : "index.html";
    res.writeHead(200, {
      "content-type": TYPES[name],
      "content-security-policy": CSP,
      "x-content-type-options": "nosniff",
      "referrer-policy": "no-referrer",
      "cache-control": "no-store",
    });
    res.end(readFileSync(join(dist, name)));
  })
  .listen(port, "127.0.0.1", () => console.log(`console on http://127.0.0.1:${port} (admin API ${admin})`));
