// The audit trail (admin): every admin mutation and refused call, newest first, with filters.
import { useEffect, useId, useState } from "preact/hooks";
import { api } from "../api.js";
import type { AuditEvent } from "../gen/portcullis/admin/v1/audit_pb.js";
import { gateways } from "../gateways-store.js";
import { query, setQuery } from "../router.js";
import { Empty, ErrorNote, Time, useLoad } from "../ui.js";

export function AuditPage() {
  const id = useId();
  const q = query.value;
  const gateway = q.get("gateway") ?? "";
  const [more, setMore] = useState<{ events: AuditEvent[]; next: string }>({ events: [], next: "" });
  const { data, error, loading } = useLoad(() => api.audit.listAuditEvents({ gateway, pageSize: 50 }), [gateway]);
  useEffect(() => setMore({ events: [], next: "" }), [data]);
  const events = [...(data?.events ?? []), ...more.events];
  const next = more.next || data?.nextPageToken || "";
  const [moreError, setMoreError] = useState("");
  return (
    <section aria-labelledby={`${id}-h`}>
      <div class="page-head">
        <h1 id={`${id}-h`}>Audit trail</h1>
      </div>
      <p class="lead">Every admin change and every refused admin call, newest first.</p>
      <form class="toolbar" role="search" onSubmit={(e) => e.preventDefault()}>
        <div class="field inline">
          <label for={`${id}-gw`}>Gateway</label>
          <select id={`${id}-gw`} value={gateway} onChange={(e) => setQuery({ gateway: e.currentTarget.value })}>
            <option value="">All</option>
            {(gateways.value ?? []).map((g) => (
              <option value={g.name}>{g.name}</option>
            ))}
          </select>
        </div>
      </form>
      <ErrorNote error={error || moreError} />
      <div class="table-wrap">
        <table class="audit">
          <thead>
            <tr>
              <th scope="col">When</th>
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
                  <Time ts={e.time} />
                </td>
                <td>{e.tokenName || <span class="muted">unauthenticated</span>}</td>
                <td class="mono">{e.action}</td>
                <td>{e.gateway || <span class="muted">—</span>}</td>
                <td class="mono">{e.target || <span class="muted">—</span>}</td>
                <td>{e.result === "OK" ? <span class="badge ok">OK</span> : <span class="badge bad">{e.result}</span>}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {!loading && events.length === 0 ? <Empty>No events match.</Empty> : null}
      {loading ? <p role="status" class="muted">Loading events…</p> : null}
      {next ? (
        <nav class="pager">
          <button
            type="button"
            onClick={async () => {
              try {
                const r = await api.audit.listAuditEvents({ gateway, pageSize: 50, pageToken: next });
                setMore({ events: [...more.events, ...r.events], next: r.nextPageToken });
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
