// The gateways this token may see, loaded once per sign-in; the current one comes from the URL.
import { computed, signal } from "@preact/signals";
import { api, me } from "./api.js";
import type { Gateway } from "./gen/portcullis/admin/v1/gateways_pb.js";
import { query } from "./router.js";

export const gateways = signal<Gateway[] | null>(null);
export const gatewaysError = signal("");

export async function loadGateways(): Promise<void> {
  try {
    const r = await api.gateways.listGateways({});
    const scope = me.value?.gateways ?? [];
    gateways.value = r.gateways.filter((g) => scope.length === 0 || scope.includes(g.name)).sort((a, b) => a.name.localeCompare(b.name));
    gatewaysError.value = "";
  } catch (e) {
    // A scoped token may not list gateways: fall back to the names it holds.
    const scope = me.value?.gateways ?? [];
    gateways.value = scope.map((name) => ({ name }) as Gateway);
    gatewaysError.value = scope.length ? "" : String((e as Error).message);
  }
}

/** The gateway named in the URL, else the first one this token reaches. */
export const currentGateway = computed(() => {
  const name = query.value.get("gateway");
  const list = gateways.value ?? [];
  return list.find((g) => g.name === name)?.name ?? list[0]?.name ?? "";
});

export function gatewayByName(name: string): Gateway | undefined {
  return gateways.value?.find((g) => g.name === name);
}
