// The admin API over gRPC-Web on the page's own origin, and the signed-in session.
// The management token lives in memory; in sessionStorage only when the operator ticks
// "remember in this tab"; never in localStorage, cookies or URLs.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { computed, signal } from "@preact/signals";
import { AccessService, Role, type AccessToken } from "./gen/portcullis/admin/v1/access_pb.js";
import { AuditService } from "./gen/portcullis/admin/v1/audit_pb.js";
import { GatewayService } from "./gen/portcullis/admin/v1/gateways_pb.js";
import { KeyService } from "./gen/portcullis/admin/v1/keys_pb.js";
import { PricingService } from "./gen/portcullis/admin/v1/pricing_pb.js";
import { UsageService } from "./gen/portcullis/admin/v1/usage_pb.js";

const STORAGE_KEY = "portcullis.console.token";

let token = "";
/** Who the token belongs to (WhoAmI); null when signed out. */
export const me = signal<AccessToken | null>(null);
/** Why the operator was sent back to the sign-in screen. */
export const signedOutReason = signal("");

const auth: Interceptor = (next) => async (req) => {
  if (token) req.header.set("authorization", `Bearer ${token}`);
  try {
    return await next(req);
  } catch (e) {
    const err = ConnectError.from(e);
    if (err.code === Code.Unauthenticated && me.value) {
      signOut(`Signed out: the server refused the token (${err.rawMessage || "Unauthorized"}). It may have been revoked or expired.`);
    }
    throw err;
  }
};

const transport = createGrpcWebTransport({ baseUrl: window.location.origin, interceptors: [auth] });

export const api = {
  access: createClient(AccessService, transport),
  audit: createClient(AuditService, transport),
  gateways: createClient(GatewayService, transport),
  keys: createClient(KeyService, transport),
  pricing: createClient(PricingService, transport),
  usage: createClient(UsageService, transport),
};

/** Checks `candidate` with WhoAmI and signs in with it; throws the server's refusal. */
export async function signIn(candidate: string, remember: boolean): Promise<void> {
  const previous = token;
  token = candidate.trim();
  try {
    const who = await api.access.whoAmI({});
    if (remember) sessionStorage.setItem(STORAGE_KEY, token);
    else sessionStorage.removeItem(STORAGE_KEY);
    signedOutReason.value = "";
    me.value = who;
  } catch (e) {
    token = previous;
    throw e;
  }
}

export function signOut(reason = ""): void {
  token = "";
  sessionStorage.removeItem(STORAGE_KEY);
  signedOutReason.value = reason;
  me.value = null;
}

/** Signs in again with a token remembered in this tab, if any. */
export async function resume(): Promise<void> {
  const saved = sessionStorage.getItem(STORAGE_KEY);
  if (!saved) return;
  try {
    await signIn(saved, true);
  } catch (e) {
    signOut(`The remembered token no longer works: ${errorText(e)}`);
  }
}

export const role = computed(() => me.value?.role ?? Role.UNSPECIFIED);
export const isOwner = computed(() => role.value === Role.OWNER);
export const isAdmin = computed(() => role.value === Role.OWNER || role.value === Role.ADMIN);

/** A one-line message for an API failure, as an operator would want to read it. */
export function errorText(e: unknown): string {
  const err = ConnectError.from(e);
  switch (err.code) {
    case Code.Unauthenticated:
      return "Unauthorized: the token is missing, unknown, revoked or expired.";
    case Code.PermissionDenied:
      return err.rawMessage || "You don't have access to this.";
    case Code.Unavailable:
      return `The server is unavailable (${err.rawMessage || "storage down or unreachable"}). Try again.`;
    default:
      return err.rawMessage || err.message;
  }
}
