// Bundles the console into dist/{index.html,app.js,app.css}: the only three files the admin
// listener serves. Deterministic (no source maps, no timestamps, no metafile), so CI can rebuild
// and compare with the committed copy (check.mjs).
import { build } from "esbuild";
import { copyFileSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(fileURLToPath(import.meta.url));
const out = process.env.CONSOLE_OUT_DIR || join(root, "dist");
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });

await build({
  absWorkingDir: root,
  entryPoints: { app: "src/main.tsx" },
  bundle: true,
  outdir: out,
  format: "esm",
  target: ["es2022", "chrome110", "firefox110", "safari16"],
  minify: true,
  legalComments: "none",
  charset: "utf8",
  jsx: "automatic",
  jsxImportSource: "preact",
  define: { "process.env.NODE_ENV": '"production"' },
  logLevel: "warning",
});
copyFileSync(join(root, "index.html"), join(out, "index.html"));

const files = readdirSync(out).sort();
const want = ["app.css", "app.js", "index.html"];
if (JSON.stringify(files) !== JSON.stringify(want)) {
  console.error(`dist must hold exactly ${want.join(", ")}; it holds ${files.join(", ")}`);
  process.exit(1);
}
