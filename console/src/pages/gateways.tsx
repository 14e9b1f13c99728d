// Gateways (admin): where clients put their key, the provider credential Envoy sends upstream
// (write-only: never shown, only whether one is set), the default reservation.
import { useId, useState } from "preact/hooks";
import { api, isAdmin } from "../api.js";
import { int } from "../format.js";
import { KeyLocation, type Gateway } from "../gen/portcullis/admin/v1/gateways_pb.js";
import { loadGateways } from "../gateways-store.js";
import { href } from "../router.js";
import { CellLabel, Confirm, Dialog, Empty, ErrorNote, FormFoot, Link, TableHead, Time, useAction, useLoad } from "../ui.js";

export function GatewaysPage() {
  const id = useId();
  const { data, error, loading, reload } = useLoad(() => api.gateways.listGateways({}), []);
  const [editing, setEditing] = useState<Gateway | "new" | null>(null);
  const [deleting, setDeleting] = useState<Gateway | null>(null);
  const refresh = () => {
    reload();
    void loadGateways();
  };
  return (
    <section aria-labelledby={`${id}-h`}>
      <div class="page-head">
        <h1 id={`${id}-h`}>Gateways</h1>
        {isAdmin.value ? (
          <button type="button" class="primary" onClick={() => setEditing("new")}>
            Create gateway
          </button>
        ) : null}
      </div>
      <p class="lead">A gateway is what an Envoy route names (context_extensions.gateway).</p>
      <ErrorNote error={error} />
      <div class="table-wrap">
        <table class="stack">
          <TableHead cols={["Name", "Client key", "Provider credential", "Default reservation", "Created"]} actions />
          <tbody>
            {(data?.gateways ?? []).map((g) => (
              <tr key={g.id}>
                <th scope="row">
                  <CellLabel>Name</CellLabel>
                  <Link href={href("/keys", { gateway: g.name })}>{g.name}</Link>
                </th>
                <td>
                  <CellLabel>Client key</CellLabel>
                  <span>
                    {g.inboundAuth?.location === KeyLocation.QUERY ? "query parameter" : "header"} <code>{g.inboundAuth?.keyName || "x-api-key"}</code>
                  </span>
                </td>
                <td>
                  <CellLabel>Provider credential</CellLabel>
                  {g.upstreamAuth?.headerName ? (
                    <span>
                      <code>{g.upstreamAuth.headerName}</code> {g.upstreamAuth.valueSet ? <span class="badge ok">set</span> : <span class="badge off">not set</span>}
                    </span>
                  ) : (
                    <span class="muted">none</span>
                  )}
                </td>
                <td>
                  <CellLabel>Default reservation</CellLabel>
                  {g.defaultReservationTokens ? <span>{int(g.defaultReservationTokens)} tokens</span> : <span class="muted">4,096 tokens (built-in)</span>}
                </td>
                <td>
                  <CellLabel>Created</CellLabel>
                  <Time ts={g.createdAt} dateOnly />
                </td>
                <td class="row-actions">
                  <Link href={href("/usage", { gateway: g.name })}>Usage</Link>
                  {isAdmin.value ? (
                    <>
                      <button type="button" onClick={() => setEditing(g)} aria-label={`Edit ${g.name}`}>
                        Edit
                      </button>
                      <button type="button" class="danger" onClick={() => setDeleting(g)} aria-label={`Delete ${g.name}`}>
                        Delete
                      </button>
                    </>
                  ) : null}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {!loading && data && data.gateways.length === 0 ? <Empty>No gateways yet.</Empty> : null}
      {editing ? <GatewayDialog gateway={editing === "new" ? undefined : editing} onClose={() => setEditing(null)} onSaved={refresh} /> : null}
      {deleting ? (
        <Confirm
          title={`Delete gateway ${deleting.name}?`}
          confirmLabel="Delete gateway and its keys"
          danger
          typeToConfirm={deleting.name}
          onClose={() => setDeleting(null)}
          onConfirm={async () => {
            await api.gateways.deleteGateway({ name: deleting.name, force: true });
            refresh();
          }}
        >
          <p>Every key of this gateway is deleted with it and never authenticates again. Envoy routes naming it are refused.</p>
        </Confirm>
      ) : null}
    </section>
  );
}

function GatewayDialog(props: { gateway?: Gateway; onClose: () => void; onSaved: () => void }) {
  const id = useId();
  const g = props.gateway;
  const [name, setName] = useState(g?.name ?? "");
  const [keyName, setKeyName] = useState(g?.inboundAuth?.keyName || "x-api-key");
  const [location, setLocation] = useState(g?.inboundAuth?.location === KeyLocation.QUERY ? KeyLocation.QUERY : KeyLocation.HEADER);
  const [header, setHeader] = useState(g?.upstreamAuth?.headerName ?? "authorization");
  const [value, setValue] = useState("");
  const [reservation, setReservation] = useState(g?.defaultReservationTokens ? String(g.defaultReservationTokens) : "");
  const { busy, error, setError, run } = useAction();
  return (
    <Dialog title={g ? `Edit gateway ${g.name}` : "Create gateway"} onClose={props.onClose} wide>
      <form
        noValidate
        onSubmit={(e) => {
          e.preventDefault();
          if (!g && !/^[a-z0-9][a-z0-9-]{0,62}$/.test(name)) return setError("Name: lowercase letters, digits and '-', starting with a letter or digit");
          if (reservation && !/^\d+$/.test(reservation)) return setError("Default reservation: a whole number of tokens");
          const inboundAuth = { keyName: keyName.trim() || "x-api-key", location };
          const res = reservation ? BigInt(reservation) : 0n;
          run(async () => {
            if (g) {
              const upstreamChanged = header !== (g.upstreamAuth?.headerName ?? "") || value !== "";
              await api.gateways.updateGateway({
                name: g.name,
                inboundAuth,
                upstreamAuth: upstreamChanged ? { headerName: header.trim(), value } : undefined,
                defaultReservationTokens: res,
              });
            } else {
              await api.gateways.createGateway({
                name,
                inboundAuth,
                upstreamAuth: header.trim() && value ? { headerName: header.trim(), value } : undefined,
                defaultReservationTokens: res,
              });
            }
            setValue("");
            props.onSaved();
            props.onClose();
          });
        }}
      >
        <div class="dialog-body">
          {!g ? (
            <div class="field">
              <label for={`${id}-name`}>
                Name <span class="req">(required)</span>
              </label>
              <input id={`${id}-name`} required autoFocus autocomplete="off" placeholder="openai-prod" value={name} onInput={(e) => setName(e.currentTarget.value)} />
              <p class="hint">What Envoy routes name in context_extensions.gateway.</p>
            </div>
          ) : null}
          <fieldset>
            <legend>Client key (inbound)</legend>
            <div class="field">
              <label for={`${id}-loc`}>Sent in</label>
              <select id={`${id}-loc`} value={String(location)} onChange={(e) => setLocation(Number(e.currentTarget.value) as KeyLocation)}>
                <option value={String(KeyLocation.HEADER)}>Header</option>
                <option value={String(KeyLocation.QUERY)}>Query parameter</option>
              </select>
            </div>
            <div class="field">
              <label for={`${id}-key`}>Key name</label>
              <input id={`${id}-key`} value={keyName} onInput={(e) => setKeyName(e.currentTarget.value)} />
              <p class="hint">Default x-api-key. With authorization, a leading "Bearer " is stripped.</p>
            </div>
          </fieldset>
          <fieldset>
            <legend>Provider credential (upstream)</legend>
            <div class="field">
              <label for={`${id}-uh`}>Header name</label>
              <input id={`${id}-uh`} value={header} placeholder="authorization" onInput={(e) => setHeader(e.currentTarget.value)} />
            </div>
            <div class="field">
              <label for={`${id}-uv`}>Value</label>
              <input
                id={`${id}-uv`}
                type="password"
                autocomplete="new-password"
                placeholder={g?.upstreamAuth?.valueSet ? "A value is set; leave empty to keep it" : "Bearer sk-…"}
                value={value}
                onInput={(e) => setValue(e.currentTarget.value)}
              />
              <p class="hint">Write-only: never shown again, never logged. Clear the header name to stop sending one.</p>
            </div>
          </fieldset>
          <div class="field">
            <label for={`${id}-res`}>Default reservation, tokens</label>
            <input id={`${id}-res`} inputMode="numeric" placeholder="4096" value={reservation} onInput={(e) => setReservation(e.currentTarget.value)} />
            <p class="hint">Held for a request in flight that names no max_tokens.</p>
          </div>
          <ErrorNote error={error} />
        </div>
        <FormFoot onCancel={props.onClose} busy={busy} busyLabel="Saving…" label={g ? "Save" : "Create"} />
      </form>
    </Dialog>
  );
}
