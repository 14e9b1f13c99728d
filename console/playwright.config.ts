// Browser tests of the console against a real `portcullis serve` and a real Envoy, both started
// by tests/console_browser.rs (cargo test), which passes their addresses in the environment.
// Debian's Chromium only: Playwright's own browser downloads cannot work here.
import { defineConfig } from "@playwright/test";

const chromium = process.env.PORTCULLIS_CHROMIUM || "/usr/bin/chromium";

export default defineConfig({
  testDir: "tests",
  workers: 1,
  fullyParallel: false,
  retries: 0,
  forbidOnly: true,
  timeout: 90_000,
  expect: { timeout: 10_000 },
  reporter: [["list"]],
  outputDir: "test-results",
  use: {
    baseURL: process.env.CONSOLE_URL,
    browserName: "chromium",
    launchOptions: { executablePath: chromium, args: ["--no-sandbox", "--disable-dev-shm-usage"] },
    viewport: { width: 1280, height: 800 },
    trace: "off",
    screenshot: "only-on-failure",
  },
});
