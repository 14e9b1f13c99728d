// Usage history of a key or a gateway (GetUsageHistory): requests, tokens or cost per UTC day
// over 30 days or per hour over 7 days, as a chart with a table of the buckets that had usage.
// The range and the measure are kept in the URL (?range=, ?measure=). `tick` reloads it with
// the page around it (which then has the Refresh button).
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { useId, useRef } from "preact/hooks";
import { api } from "../api.js";
import { Chart } from "../chart.js";
import { int, localTime, usd, utcTitle, zoneName } from "../format.js";
import { Granularity, type UsageBucket, type UsageHistory as History } from "../gen/portcullis/admin/v1/usage_pb.js";
import { query, setQuery } from "../router.js";
import { ErrorNote, Loading, TableHead, useLoad } from "../ui.js";

export type Range = "30d" | "7d";
export type Measure = "requests" | "tokens" | "cost";

const HOUR = 3_600_000;
const DAY = 86_400_000;

export const RANGES: Record<Range, { label: string; granularity: Granularity; step: number; count: number; per: string }> = {
  "30d": { label: "30 days, per day", granularity: Granularity.DAY, step: DAY, count: 30, per: "day" },
  "7d": { label: "7 days, per hour", granularity: Granularity.HOUR, step: HOUR, count: 7 * 24, per: "hour" },
};

const MEASURES: Record<Measure, { label: string; unit: string }> = {
  requests: { label: "Requests", unit: "requests" },
  tokens: { label: "Tokens", unit: "tokens" },
  cost: { label: "Cost", unit: "USD" },
};

export function rangeFromQuery(q: URLSearchParams): Range {
  return q.get("range") === "7d" ? "7d" : "30d";
}

function measureFromQuery(q: URLSearchParams): Measure {
  const m = q.get("measure");
  return m === "tokens" || m === "cost" ? m : "requests";
}

/** The range's bounds: whole UTC days or hours, the current one included. */
export function bounds(range: Range, now = Date.now()): { from: Date; to: Date } {
  const r = RANGES[range];
  const end = Math.floor(now / r.step) * r.step + r.step;
  return { from: new Date(end - r.count * r.step), to: new Date(end) };
}

export function historyRequest(target: { keyId?: string; gateway?: string }, range: Range, byModel = false) {
  const { from, to } = bounds(range);
  return {
    keyId: target.keyId ?? "",
    gateway: target.keyId ? "" : (target.gateway ?? ""),
    granularity: RANGES[range].granularity,
    from: timestampFromDate(from),
    to: timestampFromDate(to),
    byModel,
  };
}

export interface Totals {
  requests: bigint;
  promptTokens: bigint;
  completionTokens: bigint;
  totalTokens: bigint;
  /** USD, summed in millionths so decimal strings add up exactly. */
  costMicros: bigint;
}

/** "0.072" → 72000n (millionths of a USD); more digits are cut. */
export function micros(s: string): bigint {
  const m = /^(-?)(\d*)(?:\.(\d*))?$/.exec((s || "0").trim());
  if (!m) return 0n;
  const v = BigInt(m[2] || "0") * 1_000_000n + BigInt(((m[3] ?? "") + "000000").slice(0, 6));
  return m[1] ? -v : v;
}

export function microsToUsd(v: bigint): string {
  const neg = v < 0n;
  const a = neg ? -v : v;
  const frac = String(a % 1_000_000n).padStart(6, "0").replace(/0+$/, "");
  return `${neg ? "-" : ""}${a / 1_000_000n}${frac ? `.${frac}` : ""}`;
}

export function sum(buckets: UsageBucket[]): Totals {
  const t: Totals = { requests: 0n, promptTokens: 0n, completionTokens: 0n, totalTokens: 0n, costMicros: 0n };
  for (const b of buckets) {
    t.requests += b.requests;
    t.promptTokens += b.promptTokens;
    t.completionTokens += b.completionTokens;
    t.totalTokens += b.totalTokens;
    t.costMicros += micros(b.costUsd);
  }
  return t;
}

/** One entry per bucket of the range, zeros where the server left a bucket out. */
function fill(h: History, range: Range): { start: number; totals: Totals }[] {
  const step = RANGES[range].step;
  const from = h.from ? timestampDate(h.from).getTime() : bounds(range).from.getTime();
  const to = h.to ? timestampDate(h.to).getTime() : bounds(range).to.getTime();
  const byStart = new Map<number, UsageBucket[]>();
  for (const b of h.buckets) {
    const t = b.start ? timestampDate(b.start).getTime() : 0;
    byStart.set(t, [...(byStart.get(t) ?? []), b]);
  }
  const out: { start: number; totals: Totals }[] = [];
  for (let t = from; t < to; t += step) out.push({ start: t, totals: sum(byStart.get(t) ?? []) });
  return out;
}

function value(t: Totals, m: Measure): number {
  return m === "requests" ? Number(t.requests) : m === "tokens" ? Number(t.totalTokens) : Number(t.costMicros) / 1e6;
}

const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const dayFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeZone: "UTC" });
const hourFmt = new Intl.DateTimeFormat(undefined, { weekday: "short", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });

/** A bucket's name: the UTC date for days, the local hour (and its UTC) for hours. */
export function bucketLabel(start: number, range: Range): string {
  return range === "30d" ? `${dayFmt.format(new Date(start))} (UTC day)` : hourFmt.format(new Date(start));
}

export function tokensText(n: bigint): string {
  return `${int(n)} ${n === 1n ? "token" : "tokens"}`;
}

export function requestsText(n: bigint): string {
  return `${int(n)} ${n === 1n ? "request" : "requests"}`;
}

/** Radio buttons drawn as one segmented control: Tab reaches the chosen one, arrows move. */
function Segmented<T extends string>(props: { label: string; value: T; options: [T, string][]; onChange: (v: T) => void }) {
  const ref = useRef<HTMLDivElement>(null);
  const move = (e: KeyboardEvent) => {
    const i = props.options.findIndex(([v]) => v === props.value);
    const d = e.key === "ArrowRight" || e.key === "ArrowDown" ? 1 : e.key === "ArrowLeft" || e.key === "ArrowUp" ? -1 : 0;
    if (!d) return;
    e.preventDefault();
    const j = (i + d + props.options.length) % props.options.length;
    props.onChange(props.options[j][0]);
    (ref.current?.querySelectorAll<HTMLButtonElement>("[role=radio]")[j])?.focus();
  };
  return (
    <div class="segmented" role="radiogroup" aria-label={props.label} ref={ref} onKeyDown={move}>
      {props.options.map(([v, text]) => (
        <button type="button" role="radio" aria-checked={v === props.value} tabIndex={v === props.value ? 0 : -1} onClick={() => props.onChange(v)}>
          {text}
        </button>
      ))}
    </div>
  );
}

/** Range and measure switches, the chart, totals and the table; `title` names the subject. */
export function UsageHistory(props: { keyId?: string; gateway?: string; heading?: string; tick?: number }) {
  const id = useId();
  const q = query.value;
  const range = rangeFromQuery(q);
  const measure = measureFromQuery(q);
  const target = props.keyId ? { keyId: props.keyId } : { gateway: props.gateway };
  const { data, error, loading, reload } = useLoad(
    () => (props.keyId || props.gateway ? api.usage.getUsageHistory(historyRequest(target, range)) : Promise.resolve(undefined)),
    [props.keyId, props.gateway, range, props.tick],
  );
  // What is drawn follows the data's own granularity, not the switch, while a new range loads.
  const shown: Range = data ? (data.granularity === Granularity.HOUR ? "7d" : "30d") : range;
  const rows = data ? fill(data, shown) : [];
  const totals = sum(data?.buckets ?? []);
  const used = rows.filter((r) => r.totals.requests > 0n || r.totals.totalTokens > 0n || r.totals.costMicros > 0n).reverse();
  const m = MEASURES[measure];
  const format = (v: number) =>
    measure === "cost" ? usd(String(v)) : measure === "tokens" ? `${int(Math.round(v))} tokens` : `${int(Math.round(v))} requests`;
  const tick = (v: number) => (measure === "cost" ? `$${v < 1 && v > 0 ? v.toFixed(2) : compact.format(v)}` : compact.format(v));

  return (
    <section class="history" aria-labelledby={`${id}-h`}>
      <div class="history-head">
        <h2 id={`${id}-h`}>{props.heading ?? "Usage history"}</h2>
        <Segmented
          label="Range"
          value={range}
          options={(Object.keys(RANGES) as Range[]).map((r) => [r, RANGES[r].label])}
          onChange={(r) => setQuery({ range: r === "30d" ? undefined : r })}
        />
        <Segmented
          label="Measure"
          value={measure}
          options={(Object.keys(MEASURES) as Measure[]).map((k) => [k, k === "cost" ? "Cost (USD)" : MEASURES[k].label])}
          onChange={(k) => setQuery({ measure: k === "requests" ? undefined : k })}
        />
        {props.tick === undefined ? (
          <button type="button" onClick={reload}>
            Refresh
          </button>
        ) : null}
      </div>
      <ErrorNote error={error} />
      {data ? (
        <>
          <p class="totals" data-testid="history-totals">
            {shown === "30d" ? "Last 30 days" : "Last 7 days"}: <strong>{requestsText(totals.requests)}</strong> ·{" "}
            <strong>{tokensText(totals.totalTokens)}</strong> ({int(totals.promptTokens)} prompt · {int(totals.completionTokens)} completion) ·{" "}
            <strong>{usd(microsToUsd(totals.costMicros))}</strong>
          </p>
          <figure class="chart">
            <Chart
              x={rows.map((r) => r.start / 1000)}
              values={rows.map((r) => value(r.totals, measure))}
              label={`${m.label} (${m.unit})`}
              unit={m.unit}
              format={format}
              tick={tick}
              when={(t) => (shown === "30d" ? bucketLabel(t * 1000, shown) : `${bucketLabel(t * 1000, shown)} (${utcTitle(new Date(t * 1000))})`)}
              utc={shown === "30d"}
              integer={measure !== "cost"}
            />
            <figcaption class="muted">
              {m.label} per {RANGES[shown].per}, in {m.unit}.{" "}
              {shown === "30d" ? "Days are UTC days." : `Hours in ${zoneName}; hover a bar for its UTC time.`} Updated every few seconds as
              replicas flush usage.
            </figcaption>
          </figure>
          <details class="history-table" open={used.length > 0 && used.length <= 10}>
            <summary>
              Table: {used.length} {used.length === 1 ? RANGES[shown].per : `${RANGES[shown].per}s`} with usage
            </summary>
            {used.length ? (
              <div class="table-wrap">
                <table>
                  <caption class="sr-only">
                    {m.label} per {RANGES[shown].per}, newest first
                  </caption>
                  <TableHead cols={[shown === "30d" ? "Day (UTC)" : `Hour (${zoneName})`, "Requests", "Tokens", "Cost (USD)"]} />
                  <tbody>
                    {used.map((r) => (
                      <tr>
                        <th scope="row">
                          <time dateTime={new Date(r.start).toISOString()} title={utcTitle(new Date(r.start))}>
                            {shown === "30d" ? dayFmt.format(new Date(r.start)) : localTime(new Date(r.start))}
                          </time>
                        </th>
                        <td>{requestsText(r.totals.requests)}</td>
                        <td>{tokensText(r.totals.totalTokens)}</td>
                        <td>{usd(microsToUsd(r.totals.costMicros))}</td>
                      </tr>
                    ))}
                  </tbody>
                </table>
              </div>
            ) : (
              <p class="muted">No usage in this range.</p>
            )}
          </details>
        </>
      ) : loading ? (
        <Loading>Loading usage history…</Loading>
      ) : null}
    </section>
  );
}
