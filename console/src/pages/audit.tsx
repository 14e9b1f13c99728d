// The audit trail (admin): every admin mutation and refused call, newest first. Filters (actor,
// action, target, time range, gateway) apply on the server and live in the URL.
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { useEffect, useId, useState } from "preact/hooks";
import { api } from "../api.js";
import { localInputValue, zoneName } from "../format.js";
import { AccessService } from "../gen/portcullis/admin/v1/access_pb.js";
import { AuditService, type AuditEvent } from "../gen/portcullis/admin/v1/audit_pb.js";
import { GatewayService } from "../gen/portcullis/admin/v1/gateways_pb.js";
import { KeyService } from "../gen/portcullis/admin/v1/keys_pb.js";
import { PricingService } from "../gen/portcullis/admin/v1/pricing_pb.js";
import { UsageService } from "../gen/portcullis/admin/v1/usage_pb.js";
import { gateways } from "../gateways-store.js";
import { query, setQuery } from "../router.js";
import { CellLabel, Empty, ErrorNote, Time, useLoad } from "../ui.js";

/** Every service and RPC the filter can name, from the generated descriptors. */
const ACTIONS: string[] = [AccessService, AuditService, GatewayService, KeyService, PricingService, UsageService].flatMap((s) => {
  const svc = s.typeName.split(".").pop()!;
  return [svc, ...s.methods.map((m) => `${svc}/${m.name}`)];
});

interface Filters {
  gateway: string;
  actor: string;
  action: string;
  target: string;
  from: string; // ISO instant (UTC) in the URL; shown in the browser's zone
  to: string;
}

const FIELDS: (keyof Filters)[] = ["gateway", "actor", "action", "target", "from", "to"];

function filtersFrom(q: URLSearchParams): Filters {
  const f = {} as Filters;
  for (const k of FIELDS) f[k] = q.get(k) ?? "";
  return f;
}

/** A datetime-local value (browser's zone) as an ISO instant, or "" when empty or invalid. */
function toInstant(local: string): string {
  if (!local) return "";
  const d = new Date(local);
  return Number.isNaN(d.getTime()) ? "" : d.toISOString();
}

function toLocalInput(iso: string): string {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : localInputValue(d);
}

function request(f: Filters, pageToken = "") {
  const ts = (iso: string) => {
    const d = iso ? new Date(iso) : undefined;
    return d && !Number.isNaN(d.getTime()) ? timestampFromDate(d) : undefined;
  };
  return {
    gateway: f.gateway,
    actor: f.actor,
    action: f.action,
    target: f.target,
    from: ts(f.from),
    to: ts(f.to),
    pageSize: 50,
    pageToken,
  };
}

export function AuditPage() {
  const id = useId();
  const applied = filtersFrom(query.value);
  const key = FIELDS.map((k) => applied[k]).join("\u0000");
  const [draft, setDraft] = useState<Filters>({ ...applied, from: toLocalInput(applied.from), to: toLocalInput(applied.to) });
  useEffect(() => setDraft({ ...applied, from: toLocalInput(applied.from), to: toLocalInput(applied.to) }), [key]);
  const [more, setMore] = useState<{ events: AuditEvent[]; next: string; loaded: boolean }>({ events: [], next: "", loaded: false });
  const { data, error, loading } = useLoad(() => api.audit.listAuditEvents(request(applied)), [key]);
  useEffect(() => setMore({ events: [], next: "", loaded: false }), [data]);
  const events = [...(data?.events ?? []), ...more.events];
  const next = more.loaded ? more.next : data?.nextPageToken || "";
  const [moreError, setMoreError] = useState("");
  const filtered = FIELDS.some((k) => applied[k]);
  const up = (c: Partial<Filters>) => setDraft({ ...draft, ...c });
  const apply = (f: Filters) =>
    setQuery(
      { gateway: f.gateway, actor: f.actor.trim(), action: f.action.trim(), target: f.target.trim(), from: toInstant(f.from), to: toInstant(f.to) },
      false,
    );

  return (
    <section aria-labelledby={`${id}-h`}>
      <div class="page-head">
        <h1 id={`${id}-h`}>Audit trail</h1>
      </div>
      <p class="lead">Every admin change and every refused admin call, newest first.</p>
      <form
        class="toolbar filters"
        role="search"
        aria-label="Filter audit events"
        onSubmit={(e) => {
          e.preventDefault();
          apply(draft);
        }}
      >
        <div class="field inline">
          <label for={`${id}-gw`}>Gateway</label>
          <select id={`${id}-gw`} value={draft.gateway} onChange={(e) => apply({ ...draft, gateway: e.currentTarget.value })}>
            <option value="">All</option>
            {(gateways.value ?? []).map((g) => (
              <option value={g.name}>{g.name}</option>
            ))}
          </select>
        </div>
        <div class="field inline">
          <label for={`${id}-actor`}>Actor</label>
          <input id={`${id}-actor`} value={draft.actor} placeholder="token name or id" onInput={(e) => up({ actor: e.currentTarget.value })} />
        </div>
        <div class="field inline">
          <label for={`${id}-action`}>Action</label>
          <input id={`${id}-action`} list={`${id}-actions`} value={draft.action} placeholder="KeyService/UpdateKey" onInput={(e) => up({ action: e.currentTarget.value })} />
          <datalist id={`${id}-actions`}>
            {ACTIONS.map((a) => (
              <option value={a} />
            ))}
          </datalist>
        </div>
        <div class="field inline">
          <label for={`${id}-target`}>Target</label>
          <input id={`${id}-target`} value={draft.target} placeholder="key id, model, …" onInput={(e) => up({ target: e.currentTarget.value })} />
        </div>
        <div class="field inline">
          <label for={`${id}-from`}>From ({zoneName})</label>
          <input id={`${id}-from`} type="datetime-local" value={draft.from} onInput={(e) => up({ from: e.currentTarget.value })} />
        </div>
        <div class="field inline">
          <label for={`${id}-to`}>To ({zoneName})</label>
          <input id={`${id}-to`} type="datetime-local" value={draft.to} onInput={(e) => up({ to: e.currentTarget.value })} />
        </div>
        <button type="submit" class="primary">
          Apply filters
        </button>
        <button type="button" disabled={!filtered} onClick={() => apply({ gateway: "", actor: "", action: "", target: "", from: "", to: "" })}>
          Clear filters
        </button>
      </form>
      <ErrorNote error={error || moreError} />
      <div class="table-wrap">
        <table class="audit stack" aria-describedby={`${id}-status`}>
          <thead>
            <tr>
              <th scope="col">When ({zoneName})</th>
              <th scope="col">Actor</th>
              <th scope="col">Action</th>
              <th scope="col">Gateway</th>
              <th scope="col">Target</th>
              <th scope="col">Result</th>
            </tr>
          </thead>
          <tbody>
            {events.map((e) => (
              <tr key={e.id}>
                <td>
                  <CellLabel>When</CellLabel>
                  <Time ts={e.time} />
                </td>
                <td>
                  <CellLabel>Actor</CellLabel>
                  {e.tokenName ? <span>{e.tokenName}</span> : <span class="muted">unauthenticated</span>}
                </td>
                <td>
                  <CellLabel>Action</CellLabel>
                  <span class="mono">{e.action}</span>
                </td>
                <td>
                  <CellLabel>Gateway</CellLabel>
                  {e.gateway ? <span>{e.gateway}</span> : <span class="muted">—</span>}
                </td>
                <td>
                  <CellLabel>Target</CellLabel>
                  {e.target ? <span class="mono">{e.target}</span> : <span class="muted">—</span>}
                </td>
                <td>
                  <CellLabel>Result</CellLabel>
                  {e.result === "OK" ? <span class="badge ok">OK</span> : <span class="badge bad">{e.result}</span>}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <p id={`${id}-status`} class="muted" role="status">
        {loading ? "Loading events…" : `${events.length.toLocaleString()} ${events.length === 1 ? "event" : "events"} shown${filtered ? " (filtered)" : ""}${next ? "; older ones below" : ""}`}
      </p>
      {!loading && !error && events.length === 0 ? <Empty>{filtered ? "No events match these filters." : "No events yet."}</Empty> : null}
      {next ? (
        <nav class="pager" aria-label="Older audit events">
          <button
            type="button"
            onClick={async () => {
              try {
                const r = await api.audit.listAuditEvents(request(applied, next));
                setMore({ events: [...more.events, ...r.events], next: r.nextPageToken, loaded: true });
              } catch (e) {
                setMoreError((e as Error).message);
              }
            }}
          >
            Load older events
          </button>
        </nav>
      ) : null}
    </section>
  );
}
