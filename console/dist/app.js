// The console's bundle is built from console/src (npm run build); this minimal one says so.
const root = document.getElementById("app");
if (root) {
  const p = document.createElement("p");
  p.textContent = "Portcullis console: this build carries no user interface yet. The admin API answers gRPC and gRPC-Web on this address.";
  root.append(p);
}
