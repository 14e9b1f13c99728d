import { useId } from "preact/hooks";
import { currentGateway, gateways } from "../gateways-store.js";
import { setQuery } from "../router.js";

/** Chooses the gateway a page shows; kept in the URL (?gateway=). */
export function GatewayPicker() {
  const id = useId();
  const list = gateways.value ?? [];
  if (list.length === 0) return <span class="muted">No gateways yet</span>;
  return (
    <div class="field inline gateway-picker">
      <label for={id}>Gateway</label>
      <select id={id} value={currentGateway.value} onChange={(e) => setQuery({ gateway: e.currentTarget.value, page: undefined }, false)}>
        {list.map((g) => (
          <option value={g.name}>{g.name}</option>
        ))}
      </select>
    </div>
  );
}
