// Management tokens (owner): create with a role and gateways (secret shown once), revoke.
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { useId, useState } from "preact/hooks";
import { api, me } from "../api.js";
import { zoneName } from "../format.js";
import { Role, TokenStatus, type AccessToken } from "../gen/portcullis/admin/v1/access_pb.js";
import { gateways } from "../gateways-store.js";
import { CellLabel, Confirm, Dialog, DoneFoot, Empty, ErrorNote, FormFoot, SecretOnce, TableHead, Time, useAction, useLoad } from "../ui.js";

export const ROLE_LABEL: Record<Role, string> = {
  [Role.UNSPECIFIED]: "Unknown",
  [Role.OWNER]: "Owner",
  [Role.ADMIN]: "Admin",
  [Role.DEVELOPER]: "Developer",
};

function TokenStatusBadge(props: { t: AccessToken }) {
  const s = props.t.status;
  const [cls, text] = s === TokenStatus.ACTIVE ? ["ok", "Active"] : s === TokenStatus.REVOKED ? ["bad", "Revoked"] : s === TokenStatus.EXPIRED ? ["off", "Expired"] : ["off", "Unknown"];
  return <span class={`badge ${cls}`}>{text}</span>;
}

export function TokensPage() {
  const id = useId();
  const { data, error, loading, reload } = useLoad(() => api.access.listAccessTokens({}), []);
  const [creating, setCreating] = useState(false);
  const [revoking, setRevoking] = useState<AccessToken | null>(null);
  return (
    <section aria-labelledby={`${id}-h`}>
      <div class="page-head">
        <h1 id={`${id}-h`}>Management tokens</h1>
        <button type="button" class="primary" onClick={() => setCreating(true)}>
          Create token
        </button>
      </div>
      <p class="lead">Who may use this console and the admin API. Owners manage everything; admins gateways, keys, prices and audit; developers keys and usage of their gateways.</p>
      <ErrorNote error={error} />
      <div class="table-wrap">
        <table class="stack">
          <TableHead cols={["Name", "Role", "Gateways", "Prefix", "Status", "Created", "Last used", "Expires"]} actions />
          <tbody>
            {(data?.tokens ?? []).map((t) => (
              <tr key={t.id}>
                <th scope="row">
                  <CellLabel>Name</CellLabel>
                  <span>
                    {t.name}
                    {t.id === me.value?.id ? <span class="badge info">you</span> : null}
                  </span>
                </th>
                <td>
                  <CellLabel>Role</CellLabel>
                  <span>{ROLE_LABEL[t.role]}</span>
                </td>
                <td>
                  <CellLabel>Gateways</CellLabel>
                  {t.gateways.length ? <span>{t.gateways.join(", ")}</span> : <span class="muted">all</span>}
                </td>
                <td>
                  <CellLabel>Prefix</CellLabel>
                  <span class="mono">{t.prefix}…</span>
                </td>
                <td>
                  <CellLabel>Status</CellLabel>
                  <TokenStatusBadge t={t} />
                </td>
                <td>
                  <CellLabel>Created</CellLabel>
                  <Time ts={t.createdAt} dateOnly />
                </td>
                <td>
                  <CellLabel>Last used</CellLabel>
                  <Time ts={t.lastUsedAt} empty="Never" />
                </td>
                <td>
                  <CellLabel>Expires</CellLabel>
                  <Time ts={t.expiresAt} empty="Never" />
                </td>
                <td class="row-actions">
                  {t.status === TokenStatus.ACTIVE && t.id !== me.value?.id ? (
                    <button type="button" class="danger" onClick={() => setRevoking(t)} aria-label={`Revoke ${t.name}`}>
                      Revoke
                    </button>
                  ) : null}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {!loading && data?.tokens.length === 0 ? <Empty>No tokens.</Empty> : null}
      {creating ? <CreateTokenDialog onClose={() => setCreating(false)} onCreated={reload} /> : null}
      {revoking ? (
        <Confirm
          title={`Revoke ${revoking.name}?`}
          confirmLabel="Revoke token"
          danger
          onClose={() => setRevoking(null)}
          onConfirm={async () => {
            await api.access.revokeAccessToken({ id: revoking.id });
            reload();
          }}
        >
          <p>Anyone using this token is refused from now on. This cannot be undone.</p>
        </Confirm>
      ) : null}
    </section>
  );
}

function CreateTokenDialog(props: { onClose: () => void; onCreated: () => void }) {
  const id = useId();
  const [name, setName] = useState("");
  const [role, setRole] = useState(Role.DEVELOPER);
  const [scope, setScope] = useState<string[]>([]);
  const [expires, setExpires] = useState("");
  const [secret, setSecret] = useState("");
  const { busy, error, setError, run } = useAction();
  const close = () => {
    setSecret("");
    props.onClose();
  };
  if (secret) {
    return (
      <Dialog title={`Token ${name} created`} onClose={close}>
        <div class="dialog-body">
          <SecretOnce secret={secret} label="Management token" />
        </div>
        <DoneFoot onDone={close} />
      </Dialog>
    );
  }
  return (
    <Dialog title="Create management token" onClose={close}>
      <form
        noValidate
        onSubmit={(e) => {
          e.preventDefault();
          if (!name.trim()) return setError("Name is required");
          let expiresAt: ReturnType<typeof timestampFromDate> | undefined;
          if (expires) {
            const d = new Date(expires);
            if (Number.isNaN(d.getTime()) || d.getTime() <= Date.now()) return setError("Expires: pick a time in the future");
            expiresAt = timestampFromDate(d);
          }
          run(async () => {
            const r = await api.access.createAccessToken({ name: name.trim(), role, gateways: scope, expiresAt });
            setSecret(r.secret);
            props.onCreated();
          });
        }}
      >
        <div class="dialog-body">
          <div class="field">
            <label for={`${id}-n`}>
              Name <span class="req">(required)</span>
            </label>
            <input id={`${id}-n`} required autoFocus autocomplete="off" placeholder="ci-deployer" value={name} onInput={(e) => setName(e.currentTarget.value)} />
          </div>
          <div class="field">
            <label for={`${id}-r`}>Role</label>
            <select id={`${id}-r`} value={String(role)} onChange={(e) => setRole(Number(e.currentTarget.value) as Role)}>
              <option value={String(Role.DEVELOPER)}>Developer: keys and usage of its gateways</option>
              <option value={String(Role.ADMIN)}>Admin: gateways, keys, prices, audit</option>
              <option value={String(Role.OWNER)}>Owner: everything, including tokens</option>
            </select>
          </div>
          <fieldset>
            <legend>Gateways (none ticked: every gateway)</legend>
            {(gateways.value ?? []).map((g) => (
              <label class="check-label">
                <input
                  type="checkbox"
                  checked={scope.includes(g.name)}
                  onChange={(e) => setScope(e.currentTarget.checked ? [...scope, g.name] : scope.filter((s) => s !== g.name))}
                />{" "}
                {g.name}
              </label>
            ))}
          </fieldset>
          <div class="field">
            <label for={`${id}-e`}>Expires at ({zoneName}; empty: after idle timeout only)</label>
            <input id={`${id}-e`} type="datetime-local" value={expires} onInput={(e) => setExpires(e.currentTarget.value)} />
          </div>
          <ErrorNote error={error} />
        </div>
        <FormFoot onCancel={close} busy={busy} busyLabel="Creating…" label="Create" />
      </form>
    </Dialog>
  );
}
