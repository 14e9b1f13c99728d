// Client-side routes in the History API; list state (filters, sort, page) lives in the query
// string so a view can be bookmarked and shared. Never put secrets here.
import { signal } from "@preact/signals";

export const path = signal(window.location.pathname);
export const query = signal(new URLSearchParams(window.location.search));

window.addEventListener("popstate", () => {
  path.value = window.location.pathname;
  query.value = new URLSearchParams(window.location.search);
});

export function navigate(to: string, replace = false): void {
  const url = new URL(to, window.location.origin);
  if (url.pathname + url.search === window.location.pathname + window.location.search) return;
  if (replace) history.replaceState(null, "", url.pathname + url.search);
  else history.pushState(null, "", url.pathname + url.search);
  path.value = url.pathname;
  query.value = new URLSearchParams(url.search);
  if (!replace) window.scrollTo(0, 0);
}

/** Changes some query parameters of the current route (empty values are dropped). */
export function setQuery(changes: Record<string, string | undefined>, replace = true): void {
  const q = new URLSearchParams(query.value);
  for (const [k, v] of Object.entries(changes)) {
    if (v === undefined || v === "") q.delete(k);
    else q.set(k, v);
  }
  const s = q.toString();
  navigate(path.value + (s ? `?${s}` : ""), replace);
}

export function href(p: string, params: Record<string, string | undefined> = {}): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  const s = q.toString();
  return p + (s ? `?${s}` : "");
}
