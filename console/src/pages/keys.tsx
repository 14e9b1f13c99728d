// Keys of a gateway: search, filter, sort and server paging (state in the URL), the
// enable/disable toggle, this period's spend against limits, bulk enable/disable/delete, Create key.
import { useEffect, useId, useState } from "preact/hooks";
import { api, errorText } from "../api.js";
import { int, tokens as fmtTokens, usd } from "../format.js";
import { KeyOrder, KeyStatus, type ApiKey, type KeyUsage } from "../gen/portcullis/admin/v1/keys_pb.js";
import { currentGateway, gatewayByName } from "../gateways-store.js";
import { expiresSoon, limitsSummary, StatusBadge } from "../keyparts.js";
import { query, setQuery } from "../router.js";
import { CellLabel, Confirm, Empty, ErrorNote, Link, Loading, Switch, Time, UsageBar, useLoad } from "../ui.js";
import { CreateKeyDialog } from "./create-key.js";
import { GatewayPicker } from "./gateway-picker.js";

const PAGE_SIZE = 25;

interface Row {
  key: ApiKey;
  usage?: KeyUsage;
}

type Sort = "name" | "created" | "last_used" | "expires" | "cost";

const ORDER: Record<Sort, KeyOrder> = {
  name: KeyOrder.NAME,
  created: KeyOrder.CREATED_AT,
  last_used: KeyOrder.LAST_USED_AT,
  expires: KeyOrder.EXPIRES_AT,
  cost: KeyOrder.SPEND,
};

/** One page, filtered, ordered and paged by the server; each key carries this period's usage. */
async function fetchPage(gateway: string, pageToken: string, search: string, status: string, sort: Sort, desc: boolean): Promise<{ rows: Row[]; next: string }> {
  const r = await api.keys.listKeys({
    gateway,
    pageSize: PAGE_SIZE,
    pageToken,
    nameContains: search,
    status: status ? (Number(status) as KeyStatus) : KeyStatus.UNSPECIFIED,
    orderBy: ORDER[sort] ?? KeyOrder.CREATED_AT,
    descending: desc,
  });
  return { rows: r.keys.map((key) => ({ key, usage: key.usage })), next: r.nextPageToken };
}

/** Runs `f` on every key in turn; refreshes the list even when some fail, then names those. */
async function eachKey(keys: ApiKey[], f: (k: ApiKey) => Promise<unknown>, done: () => void): Promise<void> {
  const failed: string[] = [];
  for (const k of keys) {
    try {
      await f(k);
    } catch (e) {
      failed.push(`${k.name}: ${errorText(e)}`);
    }
  }
  done();
  if (failed.length) throw new Error(`${failed.length} of ${keys.length} failed. ${failed.join("; ")}`);
}

export function KeysPage() {
  const gateway = currentGateway.value;
  const q = query.value;
  const search = q.get("q") ?? "";
  const status = q.get("status") ?? "";
  const sort = (q.get("sort") as Sort) || "created";
  const desc = q.get("dir") !== "asc";
  const page = q.get("page") ?? "";
  const [history, setHistory] = useState<string[]>([]);
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const [creating, setCreating] = useState(false);
  const [bulk, setBulk] = useState<"enable" | "disable" | "delete" | null>(null);
  const [rowError, setRowError] = useState("");
  const [searchDraft, setSearchDraft] = useState(search);
  const id = useId();

  useEffect(() => setSearchDraft(search), [search]);
  useEffect(() => setSelected(new Set()), [gateway, page]);

  const { data, error, loading, reload, setData } = useLoad(
    () => (gateway ? fetchPage(gateway, page, search, status, sort, desc) : Promise.resolve({ rows: [], next: "" })),
    [gateway, page, search, status, sort, desc],
  );

  const rows = data?.rows ?? [];

  const replaceKey = (k: ApiKey) =>
    setData(data && { ...data, rows: data.rows.map((r) => (r.key.id === k.id ? { ...r, key: k } : r)) });

  const toggle = async (k: ApiKey, enabled: boolean) => {
    setRowError("");
    try {
      const updated = await api.keys.updateKey({ id: k.id, enabled });
      replaceKey(Object.assign(updated, { usage: k.usage }));
    } catch (e) {
      setRowError(`${k.name}: ${(e as Error).message}`);
    }
  };

  const allChecked = rows.length > 0 && rows.every((r) => selected.has(r.key.id));
  const chosen = rows.filter((r) => selected.has(r.key.id)).map((r) => r.key);
  const gw = gatewayByName(gateway);

  return (
    <section aria-labelledby={`${id}-h`}>
      <div class="page-head">
        <h1 id={`${id}-h`}>API keys</h1>
        <GatewayPicker />
        <button type="button" class="primary" disabled={!gateway} onClick={() => setCreating(true)}>
          Create API key
        </button>
      </div>
      <p class="lead">
        Keys clients present to gateway <strong>{gateway || "—"}</strong>
        {gw?.inboundAuth ? (
          <>
            {" "}in the {gw.inboundAuth.location === 2 ? "query parameter" : "header"}{" "}
            <code>{gw.inboundAuth.keyName || "x-api-key"}</code>
          </>
        ) : null}
        . Only active keys authenticate.
      </p>
      <form
        class="toolbar"
        role="search"
        onSubmit={(e) => {
          e.preventDefault();
          setQuery({ q: searchDraft.trim(), page: undefined });
        }}
      >
        <div class="field inline">
          <label for={`${id}-q`}>Search by name</label>
          <input id={`${id}-q`} type="search" value={searchDraft} onInput={(e) => setSearchDraft(e.currentTarget.value)} placeholder="token-user01" />
        </div>
        <div class="field inline">
          <label for={`${id}-status`}>Status</label>
          <select id={`${id}-status`} value={status} onChange={(e) => setQuery({ status: e.currentTarget.value, page: undefined })}>
            <option value="">All</option>
            <option value={String(KeyStatus.ACTIVE)}>Active</option>
            <option value={String(KeyStatus.DISABLED)}>Disabled</option>
            <option value={String(KeyStatus.EXPIRED)}>Expired</option>
          </select>
        </div>
        <div class="field inline">
          <label for={`${id}-sort`}>Sort by</label>
          <select id={`${id}-sort`} value={sort} onChange={(e) => setQuery({ sort: e.currentTarget.value, page: undefined })}>
            <option value="created">Created</option>
            <option value="name">Name</option>
            <option value="last_used">Last used</option>
            <option value="expires">Expires</option>
            <option value="cost">Spend this period</option>
          </select>
        </div>
        <button type="button" aria-label={desc ? "Descending; switch to ascending" : "Ascending; switch to descending"} onClick={() => setQuery({ dir: desc ? "asc" : "", page: undefined })}>
          {desc ? "↓ Desc" : "↑ Asc"}
        </button>
        <button type="submit">Search</button>
      </form>

      {chosen.length ? (
        <div class="bulk" role="region" aria-label="Bulk actions">
          <span>{chosen.length} selected</span>
          <button type="button" onClick={() => setBulk("enable")}>
            Enable selected
          </button>
          <button type="button" onClick={() => setBulk("disable")}>
            Disable selected
          </button>
          <button type="button" class="danger" onClick={() => setBulk("delete")}>
            Delete selected
          </button>
        </div>
      ) : null}
      <ErrorNote error={error || rowError} />
      <div class="table-wrap">
        <table class="keys stack">
          <thead>
            <tr>
              <th scope="col" class="check">
                <input
                  type="checkbox"
                  aria-label="Select all keys on this page"
                  checked={allChecked}
                  onChange={(e) => setSelected(e.currentTarget.checked ? new Set(rows.map((r) => r.key.id)) : new Set())}
                />
              </th>
              <th scope="col">Name</th>
              <th scope="col">Prefix</th>
              <th scope="col">Status</th>
              <th scope="col">Enabled</th>
              <th scope="col">Created</th>
              <th scope="col">Last used</th>
              <th scope="col">Expires</th>
              <th scope="col">Limits</th>
              <th scope="col">This period</th>
            </tr>
          </thead>
          <tbody>
            {rows.map(({ key: k, usage: u }) => (
              <tr key={k.id} data-key-id={k.id}>
                <td class="check">
                  <input
                    type="checkbox"
                    aria-label={`Select ${k.name}`}
                    checked={selected.has(k.id)}
                    onChange={(e) => {
                      const s = new Set(selected);
                      if (e.currentTarget.checked) s.add(k.id);
                      else s.delete(k.id);
                      setSelected(s);
                    }}
                  />
                </td>
                <th scope="row">
                  <CellLabel>Name</CellLabel>
                  <Link href={`/keys/${encodeURIComponent(k.id)}`}>{k.name}</Link>
                </th>
                <td>
                  <CellLabel>Prefix</CellLabel>
                  <span class="mono">{k.prefix}…</span>
                </td>
                <td>
                  <CellLabel>Status</CellLabel>
                  <StatusBadge k={k} />
                </td>
                <td>
                  <CellLabel>Enabled</CellLabel>
                  <Switch checked={k.enabled} label={`Enable ${k.name}`} onChange={(v) => toggle(k, v)} />
                </td>
                <td>
                  <CellLabel>Created</CellLabel>
                  <Time ts={k.createdAt} dateOnly />
                </td>
                <td>
                  <CellLabel>Last used</CellLabel>
                  <Time ts={k.lastUsedAt} empty="Never" />
                </td>
                <td>
                  <CellLabel>Expires</CellLabel>
                  <span>
                    <Time ts={k.expiresAt} empty="Never" />
                    {expiresSoon(k.expiresAt) ? <span class="badge warn-badge">Expires within 7 days</span> : null}
                  </span>
                </td>
                <td class="limits-cell">
                  <CellLabel>Limits</CellLabel>
                  {k.legacy ? <span class="muted">None (legacy)</span> : <span>{limitsSummary(k.limits)}</span>}
                </td>
                <td class="period-cell">
                  <CellLabel>This period</CellLabel>
                  {u ? (
                    <div class="period">
                      <UsageBar
                        label="Spend"
                        used={Number(u.costUsd || 0)}
                        limit={k.limits?.costLimitUsd !== undefined ? Number(k.limits.costLimitUsd) : undefined}
                        text={k.limits?.costLimitUsd !== undefined ? `${usd(u.costUsd)} of ${usd(k.limits.costLimitUsd)}` : usd(u.costUsd)}
                      />
                      <UsageBar
                        label="Tokens"
                        used={Number(u.totalTokens)}
                        limit={k.limits?.tokenLimit !== undefined ? Number(k.limits.tokenLimit) : undefined}
                        text={k.limits?.tokenLimit !== undefined ? `${int(u.totalTokens)} of ${fmtTokens(k.limits.tokenLimit)}` : fmtTokens(u.totalTokens)}
                      />
                    </div>
                  ) : (
                    <span class="muted">—</span>
                  )}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {!loading && !error && rows.length === 0 ? (
        <Empty>{search || status ? "No keys match these filters." : "No keys yet. Create one to hand out access to this gateway."}</Empty>
      ) : null}
      {loading ? <Loading>Loading keys…</Loading> : null}
      <nav class="pager" aria-label="Pages of keys">
        <button
          type="button"
          disabled={!page}
          onClick={() => {
            const h = [...history];
            const prev = h.pop() ?? "";
            setHistory(h);
            setQuery({ page: prev });
          }}
        >
          ← Previous
        </button>
        <span class="muted">{int(PAGE_SIZE)} keys a page</span>
        <button
          type="button"
          disabled={!data?.next}
          onClick={() => {
            setHistory([...history, page]);
            setQuery({ page: data!.next });
          }}
        >
          Next →
        </button>
      </nav>

      {creating && gateway ? <CreateKeyDialog gateway={gateway} onClose={() => setCreating(false)} onCreated={reload} /> : null}
      {bulk === "enable" ? (
        <Confirm
          title={`Enable ${chosen.length} ${chosen.length === 1 ? "key" : "keys"}?`}
          confirmLabel={`Enable ${chosen.length} ${chosen.length === 1 ? "key" : "keys"}`}
          onClose={() => setBulk(null)}
          onConfirm={async () => {
            await eachKey(chosen.filter((k) => !k.enabled), (k) => api.keys.updateKey({ id: k.id, enabled: true }), reload);
            setSelected(new Set());
          }}
        >
          <p>
            {chosen.map((k) => k.name).join(", ")}: {chosen.length === 1 ? "this key authenticates" : "these keys authenticate"} again at once, unless expired.
            Limits and usage are unchanged.
          </p>
        </Confirm>
      ) : null}
      {bulk === "disable" ? (
        <Confirm
          title={`Disable ${chosen.length} ${chosen.length === 1 ? "key" : "keys"}?`}
          confirmLabel={`Disable ${chosen.length} ${chosen.length === 1 ? "key" : "keys"}`}
          onClose={() => setBulk(null)}
          onConfirm={async () => {
            await eachKey(chosen.filter((k) => k.enabled), (k) => api.keys.updateKey({ id: k.id, enabled: false }), reload);
            setSelected(new Set());
          }}
        >
          <p>
            {chosen.length} {chosen.length === 1 ? "key stops" : "keys stop"} authenticating at once: {chosen.map((k) => k.name).join(", ")}. They can be
            re-enabled at any time.
          </p>
        </Confirm>
      ) : null}
      {bulk === "delete" ? (
        <Confirm
          title={`Delete ${chosen.length} ${chosen.length === 1 ? "key" : "keys"}?`}
          confirmLabel={`Delete ${chosen.length} ${chosen.length === 1 ? "key" : "keys"}`}
          danger
          onClose={() => setBulk(null)}
          onConfirm={async () => {
            await eachKey(chosen, (k) => api.keys.deleteKey({ id: k.id }), reload);
            setSelected(new Set());
          }}
        >
          <p>
            Deleting is permanent: {chosen.length} {chosen.length === 1 ? "key" : "keys"} ({chosen.map((k) => k.name).join(", ")}) will never authenticate
            again. Usage history stays for audit.
          </p>
        </Confirm>
      ) : null}
    </section>
  );
}
