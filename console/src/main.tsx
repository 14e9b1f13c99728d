// The console: sign-in, then menus by role (developer: keys and usage; admin: + gateways,
// prices, audit; owner: + management tokens).
import "./styles.css";
import { effect } from "@preact/signals";
import { render } from "preact";
import { useEffect } from "preact/hooks";
import { isAdmin, isOwner, me, resume, signOut } from "./api.js";
import { currentGateway, gateways, loadGateways } from "./gateways-store.js";
import { ROLE_LABEL } from "./pages/tokens.js";
import { AuditPage } from "./pages/audit.js";
import { GatewaysPage } from "./pages/gateways.js";
import { KeyPage } from "./pages/key.js";
import { KeysPage } from "./pages/keys.js";
import { PricesPage } from "./pages/prices.js";
import { SignInPage } from "./pages/signin.js";
import { TokensPage } from "./pages/tokens.js";
import { UsagePage } from "./pages/usage.js";
import { href, navigate, path } from "./router.js";
import { Link } from "./ui.js";

interface Item {
  path: string;
  label: string;
  show: () => boolean;
  keepGateway?: boolean;
}

const MENU: Item[] = [
  { path: "/keys", label: "API keys", show: () => true, keepGateway: true },
  { path: "/usage", label: "Usage", show: () => true, keepGateway: true },
  { path: "/gateways", label: "Gateways", show: () => isAdmin.value },
  { path: "/prices", label: "Model prices", show: () => isAdmin.value },
  { path: "/audit", label: "Audit trail", show: () => isAdmin.value },
  { path: "/tokens", label: "Management tokens", show: () => isOwner.value },
];

effect(() => {
  if (me.value) void loadGateways();
  else gateways.value = null;
});

function Page() {
  const p = path.value;
  const keyMatch = /^\/keys\/([^/]+)$/.exec(p);
  if (keyMatch) return <KeyPage id={decodeURIComponent(keyMatch[1])} />;
  switch (p) {
    case "/keys":
      return <KeysPage />;
    case "/usage":
      return <UsagePage />;
    case "/gateways":
      return isAdmin.value ? <GatewaysPage /> : <NotAllowed />;
    case "/prices":
      return isAdmin.value ? <PricesPage /> : <NotAllowed />;
    case "/audit":
      return isAdmin.value ? <AuditPage /> : <NotAllowed />;
    case "/tokens":
      return isOwner.value ? <TokensPage /> : <NotAllowed />;
    default:
      return <NotFound />;
  }
}

function NotAllowed() {
  return (
    <section>
      <h1>Not available</h1>
      <p>Your role does not reach this page. An owner can give your token another role.</p>
    </section>
  );
}

function NotFound() {
  useEffect(() => {
    if (path.value === "/" || path.value === "/index.html") navigate("/keys", true);
  }, []);
  return (
    <section>
      <h1>Page not found</h1>
      <p>
        <Link href="/keys">Go to API keys</Link>
      </p>
    </section>
  );
}

function Shell() {
  const who = me.value!;
  const gw = currentGateway.value;
  return (
    <>
      <a class="skip" href="#main">
        Skip to content
      </a>
      <header class="top">
        <span class="brand">Portcullis</span>
        <nav aria-label="Main">
          <ul>
            {MENU.filter((m) => m.show()).map((m) => (
              <li>
                <Link href={m.keepGateway && gw ? href(m.path, { gateway: gw }) : m.path} aria-current={path.value === m.path || (m.path === "/keys" && path.value.startsWith("/keys/")) ? "page" : undefined}>
                  {m.label}
                </Link>
              </li>
            ))}
          </ul>
        </nav>
        <div class="who">
          <span title={who.gateways.length ? `Gateways: ${who.gateways.join(", ")}` : "All gateways"}>
            {who.name} <span class="badge info">{ROLE_LABEL[who.role]}</span>
          </span>
          <button type="button" onClick={() => signOut("You signed out.")}>
            Sign out
          </button>
        </div>
      </header>
      <main id="main" tabIndex={-1}>
        <Page />
      </main>
    </>
  );
}

function App() {
  return me.value ? <Shell /> : <SignInPage />;
}

const root = document.getElementById("app")!;
resume().finally(() => render(<App />, root));
