// Pieces of the key screens: status badges, the limits form (create and edit), limit summaries.
import { timestampDate, timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { useId } from "preact/hooks";
import { KeyStatus, ResetPeriod, type ApiKey, type Limits } from "./gen/portcullis/admin/v1/keys_pb.js";
import { int, localInputValue, usd, WEEK_MS, zoneName } from "./format.js";
import { Switch } from "./ui.js";

export function StatusBadge(props: { k: ApiKey }) {
  const s = props.k.status;
  const [cls, text] =
    s === KeyStatus.ACTIVE ? ["ok", "Active"] : s === KeyStatus.DISABLED ? ["off", "Disabled"] : s === KeyStatus.EXPIRED ? ["bad", "Expired"] : ["off", "Unknown"];
  return (
    <span class="badges">
      <span class={`badge ${cls}`}>{text}</span>
      {props.k.legacy ? (
        <span class="badge legacy" title="Imported legacy key: authenticates, takes no limits">
          Legacy
        </span>
      ) : null}
    </span>
  );
}

export function expiresSoon(ts: Timestamp | undefined, now = Date.now()): boolean {
  if (!ts) return false;
  const t = timestampDate(ts).getTime();
  return t > now && t - now <= WEEK_MS;
}

export const RESET_LABEL: Record<ResetPeriod, string> = {
  [ResetPeriod.NEVER]: "Never",
  [ResetPeriod.DAILY]: "Daily (00:00 UTC)",
  [ResetPeriod.WEEKLY]: "Weekly (Monday 00:00 UTC)",
  [ResetPeriod.MONTHLY]: "Monthly (the 1st, 00:00 UTC)",
};

/** "$10.00 USD · 100,000 tokens · 60 req/min, monthly" or "No limits". */
export function limitsSummary(l: Limits | undefined): string {
  if (!l) return "No limits";
  const period = { [ResetPeriod.NEVER]: " in total", [ResetPeriod.DAILY]: " per day", [ResetPeriod.WEEKLY]: " per week", [ResetPeriod.MONTHLY]: " per month" }[l.resetPeriod];
  const parts: string[] = [];
  if (l.costLimitUsd !== undefined) parts.push(usd(l.costLimitUsd) + period);
  if (l.tokenLimit !== undefined) parts.push(`${int(l.tokenLimit)} tokens${period}`);
  if (l.requestsPerMinute !== undefined) parts.push(`${int(l.requestsPerMinute)} req/min`);
  return parts.length ? parts.join(" · ") : "No limits";
}

export interface LimitsDraft {
  costOn: boolean;
  cost: string;
  tokensOn: boolean;
  tokens: string;
  rpmOn: boolean;
  rpm: string;
  reset: ResetPeriod;
  expiresOn: boolean;
  expires: string; // datetime-local value, browser's zone
}

export function draftFrom(l: Limits | undefined, expires: Timestamp | undefined): LimitsDraft {
  const inAMonth = new Date(Date.now() + 30 * 86_400_000);
  return {
    costOn: l?.costLimitUsd !== undefined,
    cost: l?.costLimitUsd ?? "",
    tokensOn: l?.tokenLimit !== undefined,
    tokens: l?.tokenLimit !== undefined ? String(l.tokenLimit) : "",
    rpmOn: l?.requestsPerMinute !== undefined,
    rpm: l?.requestsPerMinute !== undefined ? String(l.requestsPerMinute) : "",
    reset: l?.resetPeriod ?? ResetPeriod.NEVER,
    expiresOn: !!expires,
    expires: localInputValue(expires ? timestampDate(expires) : inAMonth),
  };
}

/** The limits as the API takes them, or a message naming the field that is wrong. */
export function limitsFrom(d: LimitsDraft): { limits: { costLimitUsd?: string; tokenLimit?: bigint; requestsPerMinute?: number; resetPeriod: ResetPeriod }; expiresAt?: Timestamp } | string {
  const limits: { costLimitUsd?: string; tokenLimit?: bigint; requestsPerMinute?: number; resetPeriod: ResetPeriod } = { resetPeriod: d.reset };
  if (d.costOn) {
    if (!/^\d+(\.\d{1,6})?$/.test(d.cost.trim())) return "Cost limit: enter an amount in USD, e.g. 25 or 12.50";
    limits.costLimitUsd = d.cost.trim();
  }
  if (d.tokensOn) {
    if (!/^\d+$/.test(d.tokens.trim())) return "Token limit: enter a whole number of tokens";
    limits.tokenLimit = BigInt(d.tokens.trim());
  }
  if (d.rpmOn) {
    const n = Number(d.rpm.trim());
    if (!/^\d+$/.test(d.rpm.trim()) || n < 1 || n > 4_294_967_295) return "Requests per minute: enter a whole number, at least 1";
    limits.requestsPerMinute = n;
  }
  let expiresAt: Timestamp | undefined;
  if (d.expiresOn) {
    const t = new Date(d.expires);
    if (Number.isNaN(t.getTime())) return "Expiration: pick a date and time";
    if (t.getTime() <= Date.now()) return "Expiration: pick a time in the future";
    expiresAt = timestampFromDate(t);
  }
  return { limits, expiresAt };
}

/** Toggles for cost, tokens, requests per minute, reset period and expiration (the seeds' popup). */
export function LimitsFields(props: { draft: LimitsDraft; set: (d: LimitsDraft) => void; legacy?: boolean }) {
  const id = useId();
  const d = props.draft;
  const up = (c: Partial<LimitsDraft>) => props.set({ ...d, ...c });
  if (props.legacy) {
    return <p class="muted">Legacy keys authenticate but take no limits. Create a new key to set limits, then disable this one.</p>;
  }
  return (
    <fieldset class="limits">
      <legend>Limits</legend>
      <div class="toggle-field">
        <Switch checked={d.costOn} label="Cost limit (USD)" showLabel onChange={(v) => up({ costOn: v })} />
        {d.costOn ? (
          <div class="field inline">
            <label for={`${id}-cost`}>Cost limit, USD</label>
            <span class="unit-input">
              <span aria-hidden="true">$</span>
              <input id={`${id}-cost`} inputMode="decimal" required placeholder="25.00" value={d.cost} onInput={(e) => up({ cost: e.currentTarget.value })} />
              <span aria-hidden="true">USD</span>
            </span>
          </div>
        ) : null}
      </div>
      <div class="toggle-field">
        <Switch checked={d.tokensOn} label="Token limit" showLabel onChange={(v) => up({ tokensOn: v })} />
        {d.tokensOn ? (
          <div class="field inline">
            <label for={`${id}-tokens`}>Token limit, tokens</label>
            <span class="unit-input">
              <input id={`${id}-tokens`} inputMode="numeric" required placeholder="1000000" value={d.tokens} onInput={(e) => up({ tokens: e.currentTarget.value })} />
              <span aria-hidden="true">tokens</span>
            </span>
          </div>
        ) : null}
      </div>
      <div class="toggle-field">
        <Switch checked={d.rpmOn} label="Requests per minute" showLabel onChange={(v) => up({ rpmOn: v })} />
        {d.rpmOn ? (
          <div class="field inline">
            <label for={`${id}-rpm`}>Requests per minute (rolling 60 s)</label>
            <span class="unit-input">
              <input id={`${id}-rpm`} inputMode="numeric" required placeholder="60" value={d.rpm} onInput={(e) => up({ rpm: e.currentTarget.value })} />
              <span aria-hidden="true">req/min</span>
            </span>
          </div>
        ) : null}
      </div>
      <div class="field">
        <label for={`${id}-reset`}>Reset limit period</label>
        <select id={`${id}-reset`} value={String(d.reset)} onChange={(e) => up({ reset: Number(e.currentTarget.value) as ResetPeriod })}>
          {[ResetPeriod.NEVER, ResetPeriod.DAILY, ResetPeriod.WEEKLY, ResetPeriod.MONTHLY].map((p) => (
            <option value={String(p)}>{RESET_LABEL[p]}</option>
          ))}
        </select>
        <p class="hint">Resets the cost and token counters. Requests per minute always use a rolling 60-second window.</p>
      </div>
      <div class="toggle-field">
        <Switch checked={d.expiresOn} label="Expiration" showLabel onChange={(v) => up({ expiresOn: v })} />
        {d.expiresOn ? (
          <div class="field inline">
            <label for={`${id}-exp`}>Expires at ({zoneName})</label>
            <input id={`${id}-exp`} type="datetime-local" required value={d.expires} onInput={(e) => up({ expires: e.currentTarget.value })} />
          </div>
        ) : (
          <span class="muted">Never expires</span>
        )}
      </div>
    </fieldset>
  );
}
