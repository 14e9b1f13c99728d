// Gateway usage: totals and the chart for the range (GetUsageHistory), the keys that spent most
// this period (ListKeys by spend, descending, first page) and usage by model over the range
// (GetUsageHistory by model, summed per model).
import { useId } from "preact/hooks";
import { api } from "../api.js";
import { int, usd } from "../format.js";
import { KeyOrder } from "../gen/portcullis/admin/v1/keys_pb.js";
import type { UsageBucket } from "../gen/portcullis/admin/v1/usage_pb.js";
import { currentGateway } from "../gateways-store.js";
import { StatusBadge } from "../keyparts.js";
import { href, query } from "../router.js";
import { Empty, ErrorNote, Link, Loading, TableHead, Time, useLoad } from "../ui.js";
import { GatewayPicker } from "./gateway-picker.js";
import { historyRequest, microsToUsd, rangeFromQuery, RANGES, requestsText, sum, tokensText, UsageHistory, type Range } from "./usage-history.js";

const TOP = 10;

export function UsagePage() {
  const id = useId();
  const gateway = currentGateway.value;
  const range = rangeFromQuery(query.value);
  return (
    <section aria-labelledby={`${id}-h`}>
      <div class="page-head">
        <h1 id={`${id}-h`}>Usage</h1>
        <GatewayPicker />
      </div>
      {gateway ? (
        <>
          <UsageHistory gateway={gateway} heading={`Usage of gateway ${gateway}`} />
          <div class="usage-grid">
            <TopKeys gateway={gateway} />
            <ByModel gateway={gateway} range={range} />
          </div>
        </>
      ) : (
        <Empty>No gateway to show yet.</Empty>
      )}
    </section>
  );
}

function TopKeys(props: { gateway: string }) {
  const id = useId();
  const { data, error, loading } = useLoad(
    () => api.keys.listKeys({ gateway: props.gateway, orderBy: KeyOrder.SPEND, descending: true, pageSize: TOP }),
    [props.gateway],
  );
  const keys = data?.keys ?? [];
  return (
    <section aria-labelledby={`${id}-h`}>
      <h2 id={`${id}-h`}>Top keys by spend</h2>
      <p class="muted">The {TOP} keys that spent most in their current budget period.</p>
      <ErrorNote error={error} />
      {keys.length ? (
        <div class="table-wrap">
          <table class="top-keys">
            <TableHead cols={["Key", "Spend (USD)", "Tokens", "Requests", "Period since"]} />
            <tbody>
              {keys.map((k) => (
                <tr key={k.id}>
                  <th scope="row">
                    <Link href={href(`/keys/${encodeURIComponent(k.id)}`)}>{k.name}</Link> <StatusBadge k={k} />
                  </th>
                  <td>{usd(k.usage?.costUsd)}</td>
                  <td>{tokensText(k.usage?.totalTokens ?? 0n)}</td>
                  <td>{requestsText(k.usage?.requests ?? 0n)}</td>
                  <td>
                    <Time ts={k.usage?.periodStart} dateOnly />
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      ) : !loading && !error ? (
        <Empty>No keys on this gateway yet.</Empty>
      ) : null}
      {loading ? <Loading>Loading keys…</Loading> : null}
    </section>
  );
}

function ByModel(props: { gateway: string; range: Range }) {
  const id = useId();
  const { data, error, loading } = useLoad(() => api.usage.getUsageHistory(historyRequest({ gateway: props.gateway }, props.range, true)), [props.gateway, props.range]);
  const groups = new Map<string, UsageBucket[]>();
  for (const b of data?.buckets ?? []) groups.set(b.model, [...(groups.get(b.model) ?? []), b]);
  const models = [...groups.entries()].map(([model, bs]) => ({ model, t: sum(bs) })).sort((a, b) => (b.t.costMicros > a.t.costMicros ? 1 : b.t.costMicros < a.t.costMicros ? -1 : Number(b.t.totalTokens - a.t.totalTokens)));
  const all = sum(data?.buckets ?? []);
  return (
    <section aria-labelledby={`${id}-h`}>
      <h2 id={`${id}-h`}>Usage by model</h2>
      <p class="muted">Last {RANGES[props.range].label.split(",")[0]}, by the model each response named.</p>
      <ErrorNote error={error} />
      {models.length ? (
        <div class="table-wrap">
          <table class="by-model">
            <TableHead cols={["Model", "Requests", "Tokens", "Cost (USD)"]} />
            <tbody>
              {models.map(({ model, t }) => (
                <tr key={model}>
                  <th scope="row" class="mono">
                    {model || <span class="muted">(no model named)</span>}
                  </th>
                  <td>{requestsText(t.requests)}</td>
                  <td>
                    {tokensText(t.totalTokens)}
                    <div class="muted small">
                      {int(t.promptTokens)} prompt · {int(t.completionTokens)} completion
                    </div>
                  </td>
                  <td>{usd(microsToUsd(t.costMicros))}</td>
                </tr>
              ))}
            </tbody>
            {models.length > 1 ? (
              <tfoot>
                <tr>
                  <th scope="row">All models</th>
                  <td>{requestsText(all.requests)}</td>
                  <td>{tokensText(all.totalTokens)}</td>
                  <td>{usd(microsToUsd(all.costMicros))}</td>
                </tr>
              </tfoot>
            ) : null}
          </table>
        </div>
      ) : !loading && !error ? (
        <Empty>No usage in this range.</Empty>
      ) : null}
      {loading ? <Loading>Loading usage by model…</Loading> : null}
    </section>
  );
}
