// The console end to end: a real portcullis behind a real Envoy, driven through Chromium.
// One serial story, as an operator would live it: sign in, set up a gateway and a price, hand
// out a key, watch it work through Envoy, switch it off and on, change its limits, read its
// Overview after metered traffic, rotate it, delete it; then tokens for other roles, their
// menus, a revoked token sent back to sign-in, and the audit row of every action; then the keys
// list's filters, sort and pages, and the keyboard and narrow-screen basics.
//
// PORTCULLIS_SCREENSHOTS=<dir> also writes the README's screenshots (console-keys.png,
// console-overview.png, 1280 px wide) into <dir>; without it nothing is written.
import { join } from "node:path";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { expect, test, type Browser, type Locator, type Page } from "@playwright/test";
import { KeyStatus } from "../src/gen/portcullis/admin/v1/keys_pb.js";
import { adminApi } from "./admin.js";
import { callGateway, upstreamReceived } from "./envoy.js";

test.describe.configure({ mode: "serial" });

const OWNER = process.env.OWNER_TOKEN ?? "";
const KEY = "token-user01";
const LEGACY = "legacy-integration";
const LEGACY_SECRET = "sk-legacy-integration-0123456789";
const shared: { secret: string; rotated: string; keyId: string; devToken: string; adminToken: string; successes: number } = {
  secret: "",
  rotated: "",
  keyId: "",
  devToken: "",
  adminToken: "",
  successes: 0,
};

/** Fails the test on CSP violations, page errors, or a secret in the URL. */
function watch(page: Page): () => void {
  const problems: string[] = [];
  page.on("console", (m) => {
    if (/Content Security Policy|Refused to/i.test(m.text())) problems.push(`CSP: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("framenavigated", (f) => {
    if (/pc[sm]_|token=/.test(f.url())) problems.push(`secret-looking URL: ${f.url()}`);
  });
  return () => expect(problems).toEqual([]);
}

async function signIn(page: Page, token: string, path = "/keys"): Promise<void> {
  await page.goto(path);
  await page.getByLabel("Management token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("navigation", { name: "Main" })).toBeVisible();
}

function menu(page: Page) {
  return page.getByRole("navigation", { name: "Main" });
}

function keyRow(page: Page, name: string) {
  return page.getByRole("row").filter({ has: page.getByRole("link", { name, exact: true }) });
}

async function expectGateway(secret: string, status: number) {
  await expect(async () => {
    const r = await callGateway(secret);
    expect(r.status, r.body).toBe(status);
  }).toPass({ timeout: 10_000 });
  if (status === 200) shared.successes += 1;
}

test("sign-in refuses a wrong token and accepts the owner's; the token is kept in memory only", async ({ page }) => {
  expect(OWNER, "OWNER_TOKEN must be set by the harness").not.toBe("");
  const done = watch(page);
  await page.goto("/keys");
  await page.getByLabel("Management token").fill("pcm_not_a_real_token_000000000000000000");
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("alert")).toContainText("Unauthorized");
  await page.getByLabel("Management token").fill(OWNER);
  await page.getByRole("button", { name: "Sign in" }).click();
  for (const item of ["API keys", "Usage", "Gateways", "Model prices", "Audit trail", "Management tokens"])
    await expect(menu(page).getByRole("link", { name: item })).toBeVisible();
  expect(await page.evaluate(() => [localStorage.length, sessionStorage.length, document.cookie])).toEqual([0, 0, ""]);
  // Not remembered: a reload asks again.
  await page.reload();
  await expect(page.getByLabel("Management token")).toBeVisible();
  done();
});

test("\"Remember in this tab\" keeps the token in this tab's sessionStorage only; another context asks again", async ({ page, browser }) => {
  const done = watch(page);
  await page.goto("/keys");
  await page.getByLabel("Management token").fill(OWNER);
  await page.getByRole("checkbox", { name: /Remember in this tab/ }).check();
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(menu(page).getByRole("link", { name: "Management tokens" })).toBeVisible();
  // A reload stays signed in, from sessionStorage; nothing in localStorage or cookies.
  await page.reload();
  await expect(menu(page).getByRole("link", { name: "Management tokens" })).toBeVisible();
  await expect(page.getByLabel("Management token")).toHaveCount(0);
  expect(await page.evaluate(() => [localStorage.length, document.cookie, Object.values(sessionStorage)])).toEqual([0, "", [OWNER]]);
  // Another browser context (another tab's storage) asks for a token.
  const other = await browser.newContext();
  const elsewhere = await other.newPage();
  await elsewhere.goto("/keys");
  await expect(elsewhere.getByLabel("Management token")).toBeVisible();
  await expect(menu(elsewhere)).toHaveCount(0);
  await other.close();
  // Signing out forgets it: the next reload asks again.
  await page.getByRole("button", { name: "Sign out" }).click();
  await expect(page.getByLabel("Management token")).toBeVisible();
  expect(await page.evaluate(() => [localStorage.length, sessionStorage.length])).toEqual([0, 0]);
  await page.reload();
  await expect(page.getByLabel("Management token")).toBeVisible();
  done();
});

test("an owner creates the gateway and a model price", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER, "/gateways");
  await page.getByRole("button", { name: "Create gateway" }).click();
  const dialog = page.getByRole("dialog", { name: "Create gateway" });
  await dialog.getByRole("textbox", { name: "Name (required)" }).fill("demo");
  await dialog.getByLabel("Value").fill("Bearer sk-provider-secret");
  await dialog.getByRole("button", { name: "Create", exact: true }).click();
  await expect(dialog).toBeHidden();
  const row = page.getByRole("row").filter({ hasText: "demo" });
  await expect(row).toContainText("x-api-key");
  // The credential's badge is the "set" one (its text is also inside "not set").
  await expect(row.locator(".badge.ok")).toHaveText("set");
  await expect(row.locator(".badge.off")).toHaveCount(0);
  await expect(page.locator("body")).not.toContainText("sk-provider-secret");

  await menu(page).getByRole("link", { name: "Model prices" }).click();
  await page.getByRole("button", { name: "Set a price" }).click();
  const price = page.getByRole("dialog");
  await price.getByLabel("Model").fill("gpt-4o-mini");
  await price.getByLabel("Input, USD per million tokens").fill("1000");
  await price.getByLabel("Output, USD per million tokens").fill("2000");
  await price.getByRole("button", { name: "Save price" }).click();
  await expect(page.getByRole("row").filter({ hasText: "gpt-4o-mini" })).toContainText("$1,000.00 USD / 1M tokens");
  done();
});

test("create key shows the secret once with a curl, and the key works through Envoy", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER);
  await page.getByRole("button", { name: "Create API key" }).click();
  const dialog = page.getByRole("dialog", { name: "Create API key" });
  await dialog.getByRole("button", { name: "Create", exact: true }).click();
  await expect(dialog.getByRole("alert")).toContainText("Name is required");
  await dialog.getByRole("textbox", { name: "Name (required)" }).fill(KEY);
  await dialog.getByRole("switch", { name: "Cost limit (USD)" }).click();
  await dialog.getByLabel("Cost limit, USD").fill("5");
  await dialog.getByRole("switch", { name: "Requests per minute" }).click();
  await dialog.getByLabel("Requests per minute (rolling 60 s)").fill("100");
  await dialog.getByRole("button", { name: "Create", exact: true }).click();

  const shown = page.getByRole("dialog", { name: `Key ${KEY} created` });
  const secret = await shown.getByRole("textbox", { name: "API key", exact: true }).inputValue();
  expect(secret).toMatch(/^pcs_[0-9A-Za-z]{38}$/);
  await expect(shown).toContainText("shown this once");
  await expect(shown.locator("pre.curl")).toContainText(`x-api-key: ${secret}`);
  await shown.getByRole("button", { name: "Done" }).click();
  await expect(shown).toBeHidden();
  // Dropped with the dialog: nowhere on the page any more.
  expect(await page.content()).not.toContain(secret);
  shared.secret = secret;

  const row = keyRow(page, KEY);
  await expect(row).toContainText(secret.slice(0, 12));
  await expect(row).toContainText("Active");
  await expect(row).toContainText("$5.00 USD");
  await expect(row).toContainText("100 req/min");
  await expectGateway(secret, 200);
  done();
});

test("the toggle disables the key (Envoy refuses it with 401) and enables it again", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER);
  const toggle = page.getByRole("switch", { name: `Enable ${KEY}` });
  await expect(toggle).toHaveAttribute("aria-checked", "true");
  await toggle.click();
  await expect(toggle).toHaveAttribute("aria-checked", "false");
  await expect(keyRow(page, KEY)).toContainText("Disabled");
  const refused = await callGateway(shared.secret);
  expect(refused.status).toBe(401);
  expect(refused.body).toContain("Invalid authentication token");
  await toggle.click();
  await expect(toggle).toHaveAttribute("aria-checked", "true");
  await expect(keyRow(page, KEY)).toContainText("Active");
  await expectGateway(shared.secret, 200);
  done();
});

test("the Overview shows metered traffic against the limits and the last denial", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER);
  await page.getByRole("link", { name: KEY, exact: true }).click();
  shared.keyId = decodeURIComponent(new URL(page.url()).pathname.split("/").pop()!);
  await expect(page.getByRole("heading", { name: "Overview" })).toBeVisible();
  // The fake upstream reports 12 prompt + 30 completion tokens a response; the price book says
  // 1000 / 2000 USD per million, so each response costs 0.072 USD.
  const n = shared.successes;
  await expect(async () => {
    await page.getByRole("button", { name: "Refresh" }).click();
    await expect(page.getByTestId("requests")).toHaveText(`${n} requests`, { timeout: 1000 });
  }).toPass({ timeout: 15_000 });
  await expect(page.getByTestId("tokens")).toHaveText(`${42 * n} tokens`);
  await expect(page.getByText(`${12 * n} prompt · ${30 * n} completion tokens`)).toBeVisible();
  await expect(page.getByTestId("cost")).toHaveText(`$${(0.072 * n).toFixed(3)} USD`);
  await expect(page.getByRole("meter", { name: "Cost budget" })).toHaveAttribute("aria-valuetext", `$${(0.072 * n).toFixed(3)} USD of $5.00 USD`);
  await expect(page.getByRole("meter", { name: "Last minute" })).toHaveAttribute("aria-valuetext", new RegExp(`of 100 req/min`));
  // The toggle test's refused call: the key was disabled.
  await expect(page.getByTestId("deny-reason")).toHaveText("disabled");
  // Times in the browser's zone, UTC on hover.
  await expect(page.locator("time").first()).toHaveAttribute("title", /UTC$/);
  done();
});

/** Today's UTC date as the history table writes it (days are UTC days). */
function utcToday(page: Page): Promise<string> {
  return page.evaluate(() => new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeZone: "UTC" }).format(new Date()));
}

test("the Overview charts usage per day and per hour, with units and a table of the buckets", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER, `/keys/${encodeURIComponent(shared.keyId)}`);
  const n = shared.successes;
  const history = page.getByRole("region", { name: "Usage history" });
  const totals = history.getByTestId("history-totals");
  // Usage history is flushed every second: refresh until it has every metered response.
  await expect(async () => {
    await page.getByRole("button", { name: "Refresh", exact: true }).click();
    await expect(totals).toContainText(`${n} requests`, { timeout: 1000 });
  }).toPass({ timeout: 15_000 });
  await expect(totals).toContainText(`Last 30 days: ${n} requests · ${42 * n} tokens (${12 * n} prompt · ${30 * n} completion) · $${(0.072 * n).toFixed(3)} USD`);
  // The chart is drawn (canvas) with its legend naming the measure and its unit.
  await expect(history.locator(".chart canvas").first()).toBeVisible();
  await expect(history.locator(".u-legend")).toContainText("Requests (requests)");
  await expect(history.locator("figcaption")).toContainText("Requests per day, in requests. Days are UTC days.");
  // The table lists today's (UTC) requests, tokens and cost.
  const today = history.getByRole("row").filter({ has: page.getByRole("rowheader", { name: await utcToday(page) }) });
  await expect(today).toContainText(`${n} requests`);
  await expect(today).toContainText(`${42 * n} tokens`);
  await expect(today).toContainText(`$${(0.072 * n).toFixed(3)} USD`);

  // Per hour over 7 days, tokens: the switch is kept in the URL and the legend follows.
  await history.getByRole("radio", { name: "7 days, per hour" }).click();
  await history.getByRole("radio", { name: "Tokens" }).click();
  await expect(page).toHaveURL(/range=7d/);
  await expect(page).toHaveURL(/measure=tokens/);
  await expect(history.getByRole("radio", { name: "Tokens" })).toHaveAttribute("aria-checked", "true");
  await expect(history.locator(".u-legend")).toContainText("Tokens (tokens)");
  await expect(totals).toContainText(`Last 7 days: ${n} requests · ${42 * n} tokens`);
  await expect(history.locator("figcaption")).toContainText("Tokens per hour, in tokens.");
  // Arrow keys move within the radio group.
  await history.getByRole("radio", { name: "Tokens" }).press("ArrowRight");
  await expect(history.getByRole("radio", { name: "Cost (USD)" })).toBeFocused();
  await expect(history.locator(".u-legend")).toContainText("Cost (USD)");

  // Readable on a phone: the chart fits 390 px and the page does not scroll sideways.
  await page.setViewportSize({ width: 390, height: 844 });
  await expect(async () => {
    const box = await history.locator(".chart canvas").first().boundingBox();
    expect(box!.width).toBeLessThanOrEqual(390);
    expect(box!.width).toBeGreaterThan(250);
  }).toPass({ timeout: 5000 });
  expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
  done();
});

test("the gateway usage page shows totals, the key among the top spenders and usage by model", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER);
  await menu(page).getByRole("link", { name: "Usage" }).click();
  await expect(page.getByRole("heading", { name: "Usage", exact: true })).toBeVisible();
  const n = shared.successes;
  const history = page.getByRole("region", { name: "Usage of gateway demo" });
  await expect(history.getByTestId("history-totals")).toContainText(`Last 30 days: ${n} requests · ${42 * n} tokens`);
  await expect(history.locator(".chart canvas").first()).toBeVisible();

  const top = page.getByRole("region", { name: "Top keys by spend" });
  const row = top.getByRole("row").filter({ has: page.getByRole("link", { name: KEY, exact: true }) });
  await expect(row).toContainText(`$${(0.072 * n).toFixed(3)} USD`);
  await expect(row).toContainText(`${42 * n} tokens`);
  await expect(row).toContainText(`${n} requests`);

  const byModel = page.getByRole("region", { name: "Usage by model" });
  const model = byModel.getByRole("row").filter({ has: page.getByRole("rowheader", { name: "gpt-4o-mini" }) });
  await expect(model).toContainText(`${n} requests`);
  await expect(model).toContainText(`${42 * n} tokens`);
  await expect(model).toContainText(`${12 * n} prompt · ${30 * n} completion`);
  await expect(model).toContainText(`$${(0.072 * n).toFixed(3)} USD`);

  // The key's name leads to its Overview.
  await row.getByRole("link", { name: KEY, exact: true }).click();
  await expect(page.getByRole("heading", { name: "Overview" })).toBeVisible();
  done();
});

test("limits and expiry are edited from the Overview", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER, `/keys/${encodeURIComponent(shared.keyId)}`);
  await page.getByRole("button", { name: "Edit limits" }).click();
  const dialog = page.getByRole("dialog", { name: `Edit ${KEY}` });
  await dialog.getByRole("switch", { name: "Token limit" }).click();
  await dialog.getByLabel("Token limit, tokens").fill("1000");
  await dialog.getByLabel("Reset limit period").selectOption({ label: "Daily (00:00 UTC)" });
  await dialog.getByRole("switch", { name: "Expiration" }).click();
  const soon = new Date(Date.now() + 3 * 86_400_000);
  const pad = (x: number) => String(x).padStart(2, "0");
  await dialog.getByLabel(/Expires at/).fill(`${soon.getFullYear()}-${pad(soon.getMonth() + 1)}-${pad(soon.getDate())}T12:00`);
  await dialog.getByRole("button", { name: "Save" }).click();
  await expect(dialog).toBeHidden();
  await expect(page.locator(".facts")).toContainText("1,000 tokens per day");
  await expect(page.getByText("Within 7 days")).toBeVisible();
  await expect(page.getByRole("meter", { name: "Token budget" })).toHaveAttribute("aria-valuetext", /of 1,000 tokens/);
  await expectGateway(shared.secret, 200);
  done();
});

/** Whether the page scrolls sideways (wider than its viewport). */
function scrollsSideways(page: Page): Promise<boolean> {
  return page.evaluate(() => document.scrollingElement!.scrollWidth > document.scrollingElement!.clientWidth);
}

/** Writes a README screenshot when PORTCULLIS_SCREENSHOTS names a directory; otherwise nothing. */
async function screenshot(page: Page, name: string, fullPage = false): Promise<void> {
  const dir = process.env.PORTCULLIS_SCREENSHOTS;
  if (!dir) return;
  expect(page.viewportSize()?.width).toBe(1280);
  // No hover or focus ring on whatever was clicked last.
  await page.mouse.move(0, 0);
  await page.evaluate(() => (document.activeElement as HTMLElement | null)?.blur());
  await page.screenshot({ path: join(dir, name), fullPage, animations: "disabled", caret: "hide" });
}

test("the keys page badges a legacy key and flags a key expiring within 7 days (and the README screenshots)", async ({ page }) => {
  const done = watch(page);
  // A secret clients already hold, brought under management; it authenticates through Envoy.
  const imported = await adminApi(OWNER).keys.importLegacyKey({ gateway: "demo", name: LEGACY, secret: LEGACY_SECRET });
  expect(imported.legacy).toBe(true);
  await expect(async () => expect((await callGateway(LEGACY_SECRET)).status).toBe(200)).toPass({ timeout: 10_000 });

  // Remembered in this tab, so that a reload re-reads the list: last use reaches it with the next
  // usage flush (every second).
  await page.goto("/keys?gateway=demo");
  await page.getByLabel("Management token").fill(OWNER);
  await page.getByRole("checkbox", { name: /Remember in this tab/ }).check();
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(menu(page)).toBeVisible();
  const legacy = keyRow(page, LEGACY);
  await expect(async () => {
    await page.reload();
    await expect(legacy.locator("td").nth(5)).toHaveText(/\d/, { timeout: 1000 });
  }).toPass({ timeout: 15_000 });
  await expect(legacy.locator(".badge.legacy")).toHaveText("Legacy");
  await expect(legacy.locator(".badge.ok")).toHaveText("Active");
  // What the cell shows (innerText): its column name, for the narrow layout, is in the DOM but hidden.
  await expect(legacy.locator(".limits-cell")).toHaveText("None (legacy)", { useInnerText: true });
  await expect(legacy).not.toContainText("Expires within 7 days");
  // The edit above set token-user01 to expire in 3 days.
  const key = keyRow(page, KEY);
  await expect(key.getByText("Expires within 7 days")).toBeVisible();
  await expect(key.locator(".badge.legacy")).toHaveCount(0);
  await expect(key).toContainText("1,000 tokens per day");
  // At 1280 px with every column filled (last used, an expiry and its flag, limits, bars), neither
  // the page nor the table scrolls sideways.
  expect(await scrollsSideways(page)).toBe(false);
  expect(await page.locator(".table-wrap").evaluate((w) => w.scrollWidth <= w.clientWidth)).toBe(true);
  await screenshot(page, "console-keys.png");

  // The Overview with its chart, once the history has every metered response of the key.
  await key.getByRole("link", { name: KEY, exact: true }).click();
  const history = page.getByRole("region", { name: "Usage history" });
  await expect(async () => {
    await page.getByRole("button", { name: "Refresh", exact: true }).click();
    await expect(history.getByTestId("history-totals")).toContainText(`Last 30 days: ${shared.successes} requests`, { timeout: 1000 });
  }).toPass({ timeout: 15_000 });
  await expect(history.locator(".chart canvas").first()).toBeVisible();
  await expect(page.getByTestId("requests")).toHaveText(`${shared.successes} requests`);
  expect(await scrollsSideways(page)).toBe(false);
  await screenshot(page, "console-overview.png", true);
  done();
});

test("rotate shows a new secret once; the old secret stops, the new one works", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER, `/keys/${encodeURIComponent(shared.keyId)}`);
  await page.getByRole("button", { name: "Rotate" }).click();
  const dialog = page.getByRole("dialog", { name: `Rotate ${KEY}` });
  await dialog.getByLabel("Old secret keeps working for").selectOption({ label: "None: the old secret stops at once" });
  await dialog.getByRole("button", { name: "Rotate key" }).click();
  const shown = page.getByRole("dialog", { name: `New secret for ${KEY}` });
  const rotated = await shown.getByRole("textbox", { name: "New API key", exact: true }).inputValue();
  expect(rotated).toMatch(/^pcs_/);
  expect(rotated).not.toBe(shared.secret);
  await shown.getByRole("button", { name: "Done" }).click();
  expect(await page.content()).not.toContain(rotated);
  shared.rotated = rotated;
  expect((await callGateway(shared.secret)).status).toBe(401);
  await expectGateway(rotated, 200);
  done();
});

test("editing a gateway with the credential left empty keeps it, even under a new header name", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER, "/gateways");
  await page.getByRole("button", { name: "Edit demo" }).click();
  const dialog = page.getByRole("dialog", { name: "Edit gateway demo" });
  const value = dialog.getByLabel("Value");
  await expect(value).toHaveValue("");
  await expect(value).toHaveAttribute("placeholder", "A value is set; leave empty to keep it");
  await dialog.getByLabel("Header name").fill("x-provider-key");
  await dialog.getByLabel("Default reservation, tokens").fill("2048");
  await dialog.getByRole("button", { name: "Save" }).click();
  await expect(dialog).toBeHidden();
  const row = page.getByRole("row").filter({ has: page.getByRole("link", { name: "demo", exact: true }) });
  await expect(row.locator("code").nth(1)).toHaveText("x-provider-key");
  await expect(row.locator(".badge.ok")).toHaveText("set");
  await expect(row).toContainText("2,048 tokens");
  // Upstream now gets the stored credential under the new name, and no longer under the old one.
  await expect(async () => {
    const before = (await upstreamReceived()).length;
    expect((await callGateway(shared.rotated)).status).toBe(200);
    const sent = (await upstreamReceived()).slice(before);
    expect(sent).toHaveLength(1);
    expect(sent[0].headers["x-provider-key"]).toBe("Bearer sk-provider-secret");
    expect(sent[0].headers.authorization).toBeUndefined();
  }).toPass({ timeout: 10_000 });
  await expect(page.locator("body")).not.toContainText("sk-provider-secret");
  done();
});

test("bulk disable, enable and delete act on the selected keys; delete asks to confirm the count", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER);
  for (const name of ["bulk-a", "bulk-b"]) {
    await page.getByRole("button", { name: "Create API key" }).click();
    const dialog = page.getByRole("dialog", { name: "Create API key" });
    await dialog.getByRole("textbox", { name: "Name (required)" }).fill(name);
    await dialog.getByRole("button", { name: "Create", exact: true }).click();
    await page.getByRole("dialog", { name: `Key ${name} created` }).getByRole("button", { name: "Done" }).click();
  }
  // The server filters by name; the search is kept in the URL.
  await page.getByLabel("Search by name").fill("bulk-");
  await page.getByRole("button", { name: "Search" }).click();
  await expect(page).toHaveURL(/q=bulk-/);
  await expect(page.getByRole("link", { name: KEY, exact: true })).toHaveCount(0);
  const selectBoth = async () => {
    await page.getByRole("checkbox", { name: "Select bulk-a" }).check();
    await page.getByRole("checkbox", { name: "Select bulk-b" }).check();
  };
  await selectBoth();
  await page.getByRole("button", { name: "Disable selected" }).click();
  await page.getByRole("dialog", { name: "Disable 2 keys?" }).getByRole("button", { name: "Disable 2 keys" }).click();
  for (const name of ["bulk-a", "bulk-b"]) {
    await expect(keyRow(page, name)).toContainText("Disabled");
    await expect(page.getByRole("switch", { name: `Enable ${name}` })).toHaveAttribute("aria-checked", "false");
  }
  await selectBoth();
  await page.getByRole("button", { name: "Enable selected" }).click();
  const enable = page.getByRole("dialog", { name: "Enable 2 keys?" });
  await expect(enable).toContainText(/bulk-a, bulk-b|bulk-b, bulk-a/);
  await enable.getByRole("button", { name: "Enable 2 keys" }).click();
  await expect(enable).toBeHidden();
  for (const name of ["bulk-a", "bulk-b"]) {
    await expect(keyRow(page, name)).toContainText("Active");
    await expect(page.getByRole("switch", { name: `Enable ${name}` })).toHaveAttribute("aria-checked", "true");
  }
  await expect(page.getByRole("region", { name: "Bulk actions" })).toHaveCount(0);
  await selectBoth();
  await page.getByRole("button", { name: "Delete selected" }).click();
  const confirm = page.getByRole("dialog", { name: "Delete 2 keys?" });
  await expect(confirm).toContainText(/bulk-a, bulk-b|bulk-b, bulk-a/);
  await confirm.getByRole("button", { name: "Delete 2 keys" }).click();
  await expect(page.getByRole("link", { name: "bulk-a" })).toHaveCount(0);
  await expect(page.getByRole("link", { name: "bulk-b" })).toHaveCount(0);
  await menu(page).getByRole("link", { name: "API keys" }).click();
  await expect(page.getByRole("link", { name: KEY, exact: true })).toBeVisible();
  done();
});

test("delete needs the key's name typed; the key never works again", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER, `/keys/${encodeURIComponent(shared.keyId)}`);
  await page.getByRole("button", { name: "Delete" }).click();
  const dialog = page.getByRole("dialog", { name: `Delete key ${KEY}?` });
  const confirm = dialog.getByRole("button", { name: "Delete key" });
  await expect(confirm).toBeDisabled();
  await dialog.getByLabel(/Type .* to confirm/).fill("token-user0");
  await expect(confirm).toBeDisabled();
  await dialog.getByLabel(/Type .* to confirm/).fill(KEY);
  await confirm.click();
  await expect(page.getByRole("heading", { name: "API keys" })).toBeVisible();
  await expect(page.getByRole("link", { name: KEY, exact: true })).toHaveCount(0);
  expect((await callGateway(shared.rotated)).status).toBe(401);
  done();
});

async function createToken(page: Page, name: string, role: string, gateway?: string): Promise<string> {
  await page.getByRole("button", { name: "Create token" }).click();
  const dialog = page.getByRole("dialog", { name: "Create management token" });
  await dialog.getByRole("textbox", { name: "Name (required)" }).fill(name);
  await dialog.getByLabel("Role").selectOption({ label: role });
  if (gateway) await dialog.getByRole("checkbox", { name: gateway }).check();
  await dialog.getByRole("button", { name: "Create", exact: true }).click();
  const shown = page.getByRole("dialog", { name: `Token ${name} created` });
  const secret = await shown.getByRole("textbox", { name: "Management token", exact: true }).inputValue();
  expect(secret).toMatch(/^pcm_/);
  await shown.getByRole("button", { name: "Done" }).click();
  await expect(page.getByRole("row").filter({ hasText: name })).toContainText("Active");
  return secret;
}

test("an owner creates developer and admin tokens; each sees the menus of its role", async ({ page, browser }) => {
  const done = watch(page);
  await signIn(page, OWNER, "/tokens");
  shared.devToken = await createToken(page, "dev-demo", "Developer: keys and usage of its gateways", "demo");
  shared.adminToken = await createToken(page, "ops-admin", "Admin: gateways, keys, prices, audit");
  done();

  const dev = await asRole(browser, shared.devToken);
  await expect(menu(dev).getByRole("link")).toHaveText(["API keys", "Usage"]);
  await expect(dev.getByRole("heading", { name: "API keys" })).toBeVisible();
  // A developer scoped to demo reads its usage too.
  await menu(dev).getByRole("link", { name: "Usage" }).click();
  await expect(dev.getByRole("region", { name: "Usage of gateway demo" }).getByTestId("history-totals")).toContainText("Last 30 days:");
  await expect(dev.getByRole("region", { name: "Usage by model" }).getByRole("rowheader", { name: "gpt-4o-mini" })).toBeVisible();
  await expect(dev.getByRole("alert")).toHaveCount(0);
  await dev.close();

  const admin = await asRole(browser, shared.adminToken);
  await expect(menu(admin).getByRole("link")).toHaveText(["API keys", "Usage", "Gateways", "Model prices", "Audit trail"]);
  await admin.close();
});

async function asRole(browser: Browser, token: string): Promise<Page> {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  await signIn(page, token);
  return page;
}

test("a developer cannot reach the gateway screen; an admin deletes a model price", async ({ browser }) => {
  // Typed in the address bar: the page says the role does not reach it, with nothing to edit.
  const devCtx = await browser.newContext();
  const dev = await devCtx.newPage();
  await signIn(dev, shared.devToken, "/gateways");
  await expect(dev.getByRole("heading", { name: "Not available" })).toBeVisible();
  await expect(menu(dev).getByRole("link", { name: "Gateways" })).toHaveCount(0);
  await expect(dev.getByRole("button", { name: /^(Edit|Create gateway)/ })).toHaveCount(0);
  await expect(dev.getByRole("table")).toHaveCount(0);
  await devCtx.close();

  const adminCtx = await browser.newContext();
  const admin = await adminCtx.newPage();
  const done = watch(admin);
  await signIn(admin, shared.adminToken, "/prices");
  const row = admin.getByRole("row").filter({ has: admin.getByRole("rowheader", { name: "gpt-4o-mini" }) });
  await expect(row).toBeVisible();
  await row.getByRole("button", { name: "Delete price of gpt-4o-mini" }).click();
  const confirm = admin.getByRole("dialog", { name: "Delete the price of gpt-4o-mini?" });
  await confirm.getByRole("button", { name: "Delete price" }).click();
  await expect(confirm).toBeHidden();
  await expect(row).toHaveCount(0);
  await expect(admin.getByText(/^No prices:/)).toBeVisible();
  // Gone on the server, not only from the page.
  await signIn(admin, shared.adminToken, "/prices");
  await expect(admin.getByText(/^No prices:/)).toBeVisible();
  await expect(admin.getByRole("rowheader", { name: "gpt-4o-mini" })).toHaveCount(0);
  done();
  await adminCtx.close();
});

test("a revoked token is sent back to sign-in with the reason", async ({ page, browser }) => {
  const dev = await asRole(browser, shared.devToken);
  const done = watch(page);
  await signIn(page, OWNER, "/tokens");
  await page.getByRole("button", { name: "Revoke dev-demo" }).click();
  await page.getByRole("dialog", { name: "Revoke dev-demo?" }).getByRole("button", { name: "Revoke token" }).click();
  await expect(page.getByRole("row").filter({ hasText: "dev-demo" })).toContainText("Revoked");
  done();
  // The next call the page makes (the Usage page's history) is refused: back to sign-in, saying why.
  await menu(dev).getByRole("link", { name: "Usage" }).click();
  await expect(dev.getByLabel("Management token")).toBeVisible();
  await expect(dev.getByRole("alert")).toContainText("Signed out");
  await dev.close();
});

test("the audit trail has a row for each action, newest first", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER, "/audit");
  const table = page.locator("table.audit");
  for (const action of [
    "GatewayService/CreateGateway",
    "GatewayService/UpdateGateway",
    "PricingService/SetModelPrice",
    "PricingService/DeleteModelPrice",
    "KeyService/CreateKey",
    "KeyService/ImportLegacyKey",
    "KeyService/UpdateKey",
    "KeyService/RotateKey",
    "KeyService/DeleteKey",
    "AccessService/CreateAccessToken",
    "AccessService/RevokeAccessToken",
  ])
    await expect(table.getByRole("row").filter({ hasText: action }).first()).toContainText("OK");
  // Refused calls are audited too: the revoked token's last call is the newest row.
  await expect(table.getByRole("row").nth(1)).toContainText("UNAUTHENTICATED");
  const rows = await table.getByRole("row").allTextContents();
  const at = (action: string) => rows.findIndex((r) => r.includes(action));
  expect(at("AccessService/RevokeAccessToken")).toBeLessThan(at("AccessService/CreateAccessToken"));
  expect(at("KeyService/DeleteKey")).toBeLessThan(at("KeyService/RotateKey"));
  expect(at("KeyService/RotateKey")).toBeLessThan(at("GatewayService/CreateGateway"));
  done();
});

test("audit filters narrow the list on the server and stay in the URL", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER, "/audit");
  const body = page.locator("table.audit tbody");
  await expect(body.getByRole("row").first()).toBeVisible();
  const allRows = await body.getByRole("row").count();

  await page.getByRole("combobox", { name: "Action" }).fill("KeyService/CreateKey");
  await page.getByRole("button", { name: "Apply filters" }).click();
  await expect(page).toHaveURL(/action=KeyService%2FCreateKey/);
  // token-user01, bulk-a and bulk-b were created; nothing else shows.
  await expect(body.getByRole("row")).toHaveCount(3);
  for (const text of await body.getByRole("row").allTextContents()) expect(text).toContain("KeyService/CreateKey");
  await expect(page.getByRole("status").filter({ hasText: "events shown" })).toContainText("3 events shown (filtered)");

  // A whole service, and the filter survives a reload (state in the URL, token asked again).
  await page.getByRole("combobox", { name: "Action" }).fill("AccessService");
  await page.getByRole("button", { name: "Apply filters" }).click();
  await expect(page).toHaveURL(/action=AccessService(&|$)/);
  // Wait for the filtered list (the previous one had no AccessService rows), then read it.
  const accessRows = body.getByRole("row").filter({ hasText: "AccessService/" });
  await expect(accessRows.first()).toBeVisible();
  await expect(body.getByRole("row").filter({ hasNotText: "AccessService/" })).toHaveCount(0);
  const accessCount = await accessRows.count();
  for (const text of await body.getByRole("row").allTextContents()) expect(text).toMatch(/AccessService\//);
  await signIn(page, OWNER, new URL(page.url()).pathname + new URL(page.url()).search);
  await expect(page.getByRole("combobox", { name: "Action" })).toHaveValue("AccessService");
  await expect(body.getByRole("row")).toHaveCount(accessCount);
  for (const text of await body.getByRole("row").allTextContents()) expect(text).toMatch(/AccessService\//);

  // By actor (the owner's token, by name): only its calls.
  const owner = (await body.getByRole("row").first().getByRole("cell").nth(1).innerText()).trim();
  await page.getByRole("combobox", { name: "Action" }).fill("");
  await page.getByLabel("Actor").fill(owner);
  await page.getByRole("button", { name: "Apply filters" }).click();
  await expect(page).toHaveURL(/actor=/);
  // The owner deleted keys (no AccessService action): once such a row shows, the list is the
  // actor's, not the previous filter's. Every row is the owner's; nothing refused, no one else's.
  await expect(body.getByRole("row").filter({ hasText: "KeyService/DeleteKey" }).first()).toBeVisible();
  await expect(body.getByRole("row").filter({ hasText: "UNAUTHENTICATED" })).toHaveCount(0);
  await expect(body.getByRole("row").filter({ hasText: "ops-admin" })).toHaveCount(0);
  const actorRows = await body.getByRole("row").allTextContents();
  expect(actorRows.length).toBeGreaterThan(accessCount);
  for (const text of actorRows) expect(text).toContain(owner);
  await page.getByLabel("Actor").fill("nobody-such");
  await page.getByRole("button", { name: "Apply filters" }).click();
  await expect(page.getByText("No events match these filters.")).toBeVisible();
  // A time range after now: nothing.
  await page.getByLabel("Actor").fill("");
  const later = new Date(Date.now() + 86_400_000);
  const pad = (x: number) => String(x).padStart(2, "0");
  await page.getByLabel(/^From/).fill(`${later.getFullYear()}-${pad(later.getMonth() + 1)}-${pad(later.getDate())}T00:00`);
  await page.getByRole("button", { name: "Apply filters" }).click();
  await expect(page).toHaveURL(/from=\d{4}-\d\d-\d\dT/);
  await expect(page.getByText("No events match these filters.")).toBeVisible();

  await page.getByRole("button", { name: "Clear filters" }).click();
  await expect(page).toHaveURL(/\/audit$/);
  await expect(body.getByRole("row")).toHaveCount(allRows);
  done();
});

test("the console is usable at 390 px: menu, keys and the create dialog fit", async ({ page }) => {
  await page.setViewportSize({ width: 390, height: 844 });
  const done = watch(page);
  await signIn(page, OWNER);
  await expect(menu(page).getByRole("link", { name: "API keys" })).toBeInViewport();
  await page.getByRole("button", { name: "Create API key" }).click();
  const dialog = page.getByRole("dialog", { name: "Create API key" });
  const box = await dialog.boundingBox();
  expect(box!.width).toBeLessThanOrEqual(390);
  expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
  done();
});

/** The key names of the list's rows, top to bottom. */
function rowNames(page: Page): Promise<string[]> {
  return page.locator("table.keys tbody th[scope=row] a").allTextContents();
}

const FLEET = Array.from({ length: 28 }, (_, i) => `fleet-${String(i).padStart(2, "0")}`);

test("the keys list filters by status, sorts and pages on the server, with its state in the URL", async ({ page }) => {
  // A gateway of 28 keys (a page is 25): two disabled, one expiring in 2 days, one in 20.
  const api = adminApi(OWNER);
  await api.gateways.createGateway({ name: "fleet" });
  const day = 86_400_000;
  for (const name of FLEET) {
    const expires = name === "fleet-04" ? 2 * day : name === "fleet-10" ? 20 * day : 0;
    const r = await api.keys.createKey({ gateway: "fleet", name, expiresAt: expires ? timestampFromDate(new Date(Date.now() + expires)) : undefined });
    if (name === "fleet-03" || name === "fleet-07") await api.keys.updateKey({ id: r.key!.id, enabled: false });
  }
  const done = watch(page);
  await signIn(page, OWNER, "/keys?gateway=fleet");
  const rows = page.locator("table.keys tbody tr");
  const next = page.getByRole("button", { name: "Next →" });
  const prev = page.getByRole("button", { name: "← Previous" });

  // Pages: 25 then 3, every key once; Previous returns to the first page.
  await expect(rows).toHaveCount(25);
  await expect(prev).toBeDisabled();
  const first = await rowNames(page);
  await next.click();
  await expect(page).toHaveURL(/[?&]page=/);
  await expect(rows).toHaveCount(3);
  await expect(next).toBeDisabled();
  const second = await rowNames(page);
  expect([...first, ...second].sort()).toEqual(FLEET);
  await prev.click();
  await expect(rows).toHaveCount(25);
  await expect(page).not.toHaveURL(/[?&]page=/);
  expect(await rowNames(page)).toEqual(first);

  // Sort by name, then ascending: fleet-00 first, the last three on page two.
  await page.getByLabel("Sort by").selectOption({ label: "Name" });
  await expect(page).toHaveURL(/sort=name/);
  await expect(rows.first()).toContainText("fleet-27");
  await page.getByRole("button", { name: "Descending; switch to ascending" }).click();
  await expect(page).toHaveURL(/dir=asc/);
  await expect(rows.first()).toContainText("fleet-00");
  expect(await rowNames(page)).toEqual(FLEET.slice(0, 25));
  await next.click();
  await expect(rows).toHaveCount(3);
  expect(await rowNames(page)).toEqual(FLEET.slice(25));
  // By expiry, soonest first (never-expiring keys last); the flag marks only the one within 7 days.
  await page.getByLabel("Sort by").selectOption({ label: "Expires" });
  await expect(page).toHaveURL(/sort=expires/);
  await expect(page).not.toHaveURL(/[?&]page=/);
  await expect(rows.nth(0)).toContainText("fleet-04");
  await expect(rows.nth(1)).toContainText("fleet-10");
  await expect(rows.nth(0).getByText("Expires within 7 days")).toBeVisible();
  await expect(rows.nth(1)).not.toContainText("Expires within 7 days");
  await expect(page.getByText("Expires within 7 days")).toHaveCount(1);

  // Status: disabled ones only, then active ones only, then no expired ones.
  const status = page.getByLabel("Status", { exact: true });
  await status.selectOption({ label: "Disabled" });
  await expect(page).toHaveURL(new RegExp(`status=${KeyStatus.DISABLED}`));
  await expect(rows).toHaveCount(2);
  await page.getByLabel("Sort by").selectOption({ label: "Name" });
  await expect(rows.first()).toContainText("fleet-03");
  expect(await rowNames(page)).toEqual(["fleet-03", "fleet-07"]);
  for (const row of await rows.all()) await expect(row.locator(".badge.off")).toHaveText("Disabled");
  // The filtered, sorted view is a link: a fresh sign-in on its URL shows the same.
  await signIn(page, OWNER, new URL(page.url()).pathname + new URL(page.url()).search);
  await expect(page.getByLabel("Status", { exact: true })).toHaveValue(String(KeyStatus.DISABLED));
  await expect(page.getByLabel("Sort by")).toHaveValue("name");
  await expect(rows).toHaveCount(2);
  expect(await rowNames(page)).toEqual(["fleet-03", "fleet-07"]);
  await status.selectOption({ label: "Active" });
  await expect(rows).toHaveCount(25);
  await expect(rows.first()).toContainText("fleet-00");
  await expect(rows.locator(".badge.off")).toHaveCount(0);
  await next.click();
  await expect(rows).toHaveCount(1);
  expect(await rowNames(page)).toEqual(["fleet-27"]);
  await status.selectOption({ label: "Expired" });
  await expect(rows).toHaveCount(0);
  await expect(page.getByText("No keys match these filters.")).toBeVisible();
  done();
});

/** The focused element's outline, as computed. */
function focusOutline(page: Page): Promise<{ style: string; width: string; color: string }> {
  return page.evaluate(() => {
    const s = getComputedStyle(document.activeElement!);
    return { style: s.outlineStyle, width: s.outlineWidth, color: s.outlineColor };
  });
}

/** Presses Tab (or Shift+Tab) and expects `next` to have the focus, with the visible outline. */
async function tabTo(page: Page, next: Locator, back = false): Promise<void> {
  await page.keyboard.press(back ? "Shift+Tab" : "Tab");
  await expect(next).toBeFocused();
  expect(await focusOutline(page)).toEqual({ style: "solid", width: "3px", color: "rgb(240, 165, 0)" });
}

test("keyboard: sign-in and the create-key dialog in order with a visible focus; focus returns when the dialog closes", async ({ page }) => {
  const done = watch(page);
  await page.goto("/keys?gateway=fleet");
  const token = page.getByLabel("Management token");
  await expect(token).toBeFocused();
  await tabTo(page, page.getByRole("checkbox", { name: /Remember in this tab/ }));
  await tabTo(page, page.getByRole("button", { name: "Sign in" }));
  await tabTo(page, page.getByRole("checkbox", { name: /Remember in this tab/ }), true);
  await tabTo(page, token, true);
  await page.keyboard.type(OWNER);
  await page.keyboard.press("Enter");
  await expect(menu(page)).toBeVisible();

  const create = page.getByRole("button", { name: "Create API key" });
  // Enabled once the gateways are loaded.
  await expect(create).toBeEnabled();
  await create.focus();
  await page.keyboard.press("Enter");
  const dialog = page.getByRole("dialog", { name: "Create API key" });
  const name = dialog.getByRole("textbox", { name: "Name (required)" });
  await expect(name).toBeFocused();
  for (const next of [
    dialog.getByRole("switch", { name: "Cost limit (USD)" }),
    dialog.getByRole("switch", { name: "Token limit" }),
    dialog.getByRole("switch", { name: "Requests per minute" }),
    dialog.getByLabel("Reset limit period"),
    dialog.getByRole("switch", { name: "Expiration" }),
    dialog.getByRole("button", { name: "Cancel" }),
    dialog.getByRole("button", { name: "Create", exact: true }),
  ])
    await tabTo(page, next);
  // Back again; a switch turned on by keyboard puts its field next in the order.
  await tabTo(page, dialog.getByRole("button", { name: "Cancel" }), true);
  await tabTo(page, dialog.getByRole("switch", { name: "Expiration" }), true);
  await tabTo(page, dialog.getByLabel("Reset limit period"), true);
  await tabTo(page, dialog.getByRole("switch", { name: "Requests per minute" }), true);
  await page.keyboard.press("Space");
  await expect(dialog.getByRole("switch", { name: "Requests per minute" })).toHaveAttribute("aria-checked", "true");
  await tabTo(page, dialog.getByLabel("Requests per minute (rolling 60 s)"));
  await tabTo(page, dialog.getByLabel("Reset limit period"));
  // Escape closes the dialog; the focus is back on the button that opened it.
  await page.keyboard.press("Escape");
  await expect(dialog).toBeHidden();
  await expect(create).toBeFocused();
  // And with Cancel.
  await page.keyboard.press("Enter");
  await expect(name).toBeFocused();
  await dialog.getByRole("button", { name: "Cancel" }).click();
  await expect(dialog).toBeHidden();
  await expect(create).toBeFocused();
  done();
});

/** The key cards' labels checked at both widths (each also a column header). */
const LABELS = ["Name", "Prefix", "Status", "Enabled", "Created", "Last used", "Expires", "Limits", "This period"];

/**
 * In a card (390 px): the cell labelled `label` shows it, and its value (the element after the
 * label; containing `value` when given) right of it on the same line, within 390 px.
 */
async function expectLabelled(row: Locator, label: string, value?: string): Promise<void> {
  const name = row.locator(".cell-label").getByText(label, { exact: true });
  const shown = name.locator("xpath=following-sibling::*[1]");
  await expect(name, label).toBeVisible();
  await expect(shown, `${label}: its value`).toBeVisible();
  if (value !== undefined) await expect(shown, `${label}: ${value}`).toContainText(value);
  const [l, v] = [(await name.boundingBox())!, (await shown.boundingBox())!];
  expect(v.x, `${label}: ${value} after its label`).toBeGreaterThanOrEqual(l.x + l.width);
  expect(v.x + v.width, `${label}: ${value} within 390 px`).toBeLessThanOrEqual(390);
  expect(Math.abs(v.y - l.y), `${label}: ${value} starts on its label's line`).toBeLessThan(l.height);
}

test("the keys page fits 1280 px without sideways scrolling, and is usable at 390 px", async ({ page }) => {
  const done = watch(page);
  await signIn(page, OWNER, "/keys?gateway=fleet&sort=expires&dir=asc");
  const rows = page.locator("table.keys tbody tr");
  await expect(rows).toHaveCount(25);
  // 1280 px: neither the page nor the table scrolls sideways; every column is in view.
  expect(await scrollsSideways(page)).toBe(false);
  const wrap = page.locator(".table-wrap");
  expect(await wrap.evaluate((w) => w.scrollWidth <= w.clientWidth)).toBe(true);
  for (const col of ["Name", "Status", "Enabled", "Expires", "Limits", "This period"]) {
    const box = (await page.getByRole("columnheader", { name: col }).boundingBox())!;
    expect(box.x + box.width, col).toBeLessThanOrEqual(1280);
  }
  // The column headers name the values; the cells' own labels (for the cards) are not shown, so
  // each name shows once, in its header, and is not part of what the cells say.
  const soon = rows.first();
  await expect(soon).toContainText("fleet-04");
  const table = page.locator("table.keys");
  for (const label of LABELS) {
    await expect(soon.getByText(label, { exact: true }), label).toBeHidden();
    await expect(table.getByText(label, { exact: true }).filter({ visible: true }), label).toHaveCount(1);
    await expect(page.getByRole("columnheader", { name: label, exact: true })).toBeVisible();
  }
  await expect(soon.getByRole("cell", { name: "Never", exact: true })).toHaveCount(1);

  // 390 px: no sideways scroll; each key a card whose name, status, toggle and flag are in view.
  await page.setViewportSize({ width: 390, height: 844 });
  await expect(async () => expect(await scrollsSideways(page)).toBe(false)).toPass({ timeout: 5000 });
  await expect(soon).toContainText("fleet-04");
  // Each value carries its column's name, at its left on the same line; the headers are hidden,
  // the table is still a table (rows and cells) to assistive technology.
  for (const label of LABELS) {
    await expect(page.getByRole("columnheader", { name: label, exact: true })).toBeHidden();
    await expect(soon.getByText(label, { exact: true }), label).toBeVisible();
  }
  await expectLabelled(soon, "Last used", "Never");
  await expectLabelled(soon, "Expires", await soon.locator("time").nth(1).innerText());
  await expectLabelled(soon, "Created", await soon.locator("time").first().innerText());
  await expectLabelled(soon, "Status", "Active");
  await expectLabelled(soon, "Limits", "No limits");
  await expectLabelled(soon, "Enabled");
  await expect(soon.getByRole("cell").filter({ hasText: "Last used" })).toHaveCount(1);
  const toggle = page.getByRole("switch", { name: "Enable fleet-04" });
  for (const part of [
    soon.getByRole("link", { name: "fleet-04" }),
    soon.locator(".badge.ok"),
    soon.getByText("Expires within 7 days"),
    toggle,
    page.getByRole("button", { name: "Create API key" }),
    page.getByRole("button", { name: "Next →" }),
  ]) {
    await part.scrollIntoViewIfNeeded();
    const box = (await part.boundingBox())!;
    expect(box.x).toBeGreaterThanOrEqual(0);
    expect(box.x + box.width).toBeLessThanOrEqual(390);
  }
  // The toggle works at this width.
  await toggle.click();
  await expect(toggle).toHaveAttribute("aria-checked", "false");
  await expect(soon.locator(".badge.off")).toHaveText("Disabled");
  await toggle.click();
  await expect(toggle).toHaveAttribute("aria-checked", "true");
  done();
});

test("the gateways, prices, tokens and audit tables: column headers at 1280 px, cards whose values carry their column names at 390 px", async ({ page }) => {
  const done = watch(page);
  // The admin deleted gpt-4o-mini's price: one to show.
  await adminApi(OWNER).pricing.setModelPrice({ price: { model: "gpt-4o", inputUsdPerMillion: "2.5", outputUsdPerMillion: "10" } });
  await signIn(page, OWNER, "/gateways");
  const tables: [string, string[]][] = [
    ["Gateways", ["Name", "Client key", "Provider credential", "Default reservation", "Created"]],
    ["Model prices", ["Model", "Input (prompt)", "Output (completion)"]],
    ["Management tokens", ["Name", "Role", "Gateways", "Prefix", "Status", "Created", "Last used", "Expires"]],
    ["Audit trail", ["When", "Actor", "Action", "Gateway", "Target", "Result"]],
  ];
  for (const [link, labels] of tables) {
    await page.setViewportSize({ width: 1280, height: 800 });
    await menu(page).getByRole("link", { name: link }).click();
    await expect(page.getByRole("heading", { name: link, exact: true })).toBeVisible();
    const row = page.locator("table.stack tbody tr").first();
    await expect(row).toBeVisible();
    for (const label of labels) {
      await expect(page.getByRole("columnheader", { name: label }).first(), `${link}: ${label}`).toBeVisible();
      await expect(row.locator(".cell-label").getByText(label, { exact: true }), `${link}: ${label}`).toBeHidden();
    }
    await page.setViewportSize({ width: 390, height: 844 });
    await expect(async () => expect(await scrollsSideways(page)).toBe(false)).toPass({ timeout: 5000 });
    for (const label of labels) await expectLabelled(row, label);
  }
  await expectLabelled(page.locator("table.audit tbody tr").first(), "Result", "OK");
  done();
});
