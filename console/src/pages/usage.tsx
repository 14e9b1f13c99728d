// Gateway usage: totals, chart, top keys, by model. Needs GetUsageHistory (issue 10's API side).
import { useId } from "preact/hooks";
import { currentGateway } from "../gateways-store.js";
import { GatewayPicker } from "./gateway-picker.js";
import { UsageHistory } from "./usage-history.js";

export function UsagePage() {
  const id = useId();
  return (
    <section aria-labelledby={`${id}-h`}>
      <div class="page-head">
        <h1 id={`${id}-h`}>Usage</h1>
        <GatewayPicker />
      </div>
      <UsageHistory gateway={currentGateway.value} />
    </section>
  );
}
