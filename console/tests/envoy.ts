// Client traffic through the Envoy the harness started (gateway "demo" is Host demo.gateway.local),
// and what the fake upstream behind it received.
import http from "node:http";

export interface Reply {
  status: number;
  body: string;
}

export function callGateway(secret: string, host = "demo.gateway.local"): Promise<Reply> {
  const port = Number(process.env.ENVOY_PORT);
  if (!port) throw new Error("ENVOY_PORT is not set: run the suite through `cargo test --test console_browser`");
  const body = JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }] });
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: "127.0.0.1",
        port,
        method: "POST",
        path: "/v1/chat/completions",
        headers: { host, "x-api-key": secret, "content-type": "application/json", "content-length": Buffer.byteLength(body) },
      },
      (res) => {
        const chunks: Uint8Array[] = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

/** A request as the fake upstream behind Envoy received it (header names in lower case). */
export interface Received {
  method: string;
  path: string;
  headers: Record<string, string>;
}

/** Everything the fake upstream received, oldest first. */
export function upstreamReceived(): Promise<Received[]> {
  const port = Number(process.env.UPSTREAM_PORT);
  if (!port) throw new Error("UPSTREAM_PORT is not set: run the suite through `cargo test --test console_browser`");
  return new Promise((resolve, reject) => {
    http
      .get({ host: "127.0.0.1", port, path: "/_fake/requests" }, (res) => {
        const chunks: Uint8Array[] = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => resolve(JSON.parse(Buffer.concat(chunks).toString()) as Received[]));
      })
      .on("error", reject);
  });
}
