// Setup through the admin API, for states a story needs but clicking through would only slow
// down (a page and more of keys, an imported legacy key): gRPC-Web from Node, as the console
// speaks it, on the same listener.
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { GatewayService } from "../src/gen/portcullis/admin/v1/gateways_pb.js";
import { KeyService } from "../src/gen/portcullis/admin/v1/keys_pb.js";
import { PricingService } from "../src/gen/portcullis/admin/v1/pricing_pb.js";

export function adminApi(token: string) {
  const baseUrl = process.env.CONSOLE_URL;
  if (!baseUrl) throw new Error("CONSOLE_URL is not set: run the suite through `cargo test --test console_browser`");
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const transport = createGrpcWebTransport({ baseUrl, interceptors: [auth] });
  return {
    gateways: createClient(GatewayService, transport),
    keys: createClient(KeyService, transport),
    pricing: createClient(PricingService, transport),
  };
}
