// CI check: regenerates the client from ../proto and rebuilds the bundle into a temporary
// directory, then fails if the committed src/gen or dist differ from what the sources produce,
// or if the bundle is over its size budget (200 KB gzipped in all).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const root = dirname(fileURLToPath(import.meta.url));
const tmp = mkdtempSync(join(tmpdir(), "console-check-"));
const run = (cmd, args, env = {}) =>
  execFileSync(cmd, args, { cwd: root, stdio: "inherit", env: { ...process.env, ...env } });

function listFiles(dir) {
  const out = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...listFiles(p));
    else out.push(p);
  }
  return out.sort();
}

function compare(committed, fresh, what) {
  const a = listFiles(committed).map((p) => relative(committed, p));
  const b = listFiles(fresh).map((p) => relative(fresh, p));
  const problems = [];
  for (const f of new Set([...a, ...b])) {
    if (!a.includes(f)) problems.push(`${what}/${f} is missing from the commit`);
    else if (!b.includes(f)) problems.push(`${what}/${f} is committed but no longer generated`);
    else if (!readFileSync(join(committed, f)).equals(readFileSync(join(fresh, f))))
      problems.push(`${what}/${f} differs from a fresh build`);
  }
  return problems;
}

let problems = [];
try {
  const gen = join(tmp, "gen");
  run("npx", ["buf", "generate", "--output", gen]);
  problems.push(...compare(join(root, "src/gen"), join(gen, "src/gen"), "src/gen"));
  run("npx", ["tsc", "--noEmit"]);
  const dist = join(tmp, "dist");
  run("node", ["build.mjs"], { CONSOLE_OUT_DIR: dist });
  problems.push(...compare(join(root, "dist"), dist, "dist"));
  let total = 0;
  for (const f of ["index.html", "app.js", "app.css"]) {
    const gz = gzipSync(readFileSync(join(dist, f)), { level: 9 }).length;
    total += gz;
    console.log(`${f}: ${(gz / 1024).toFixed(1)} KB gzipped`);
  }
  console.log(`total: ${(total / 1024).toFixed(1)} KB gzipped (budget 200 KB)`);
  if (total > 200 * 1024) problems.push(`bundle is ${(total / 1024).toFixed(1)} KB gzipped, over 200 KB`);
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
if (problems.length) {
  for (const p of problems) console.error(`console check: ${p}`);
  console.error("console check failed: run `npm run build` in console/ and commit src/gen and dist");
  process.exit(1);
}
console.log("console check: committed src/gen and dist match the sources");
