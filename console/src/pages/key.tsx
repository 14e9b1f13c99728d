// Key overview: current period against limits, requests in the last minute, reservations in
// flight, last denial; usage history; edit limits and expiry; rotate with grace; delete.
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { useId, useState } from "preact/hooks";
import { api } from "../api.js";
import { int, tokens as fmtTokens, usd } from "../format.js";
import type { ApiKey } from "../gen/portcullis/admin/v1/keys_pb.js";
import { draftFrom, expiresSoon, LimitsFields, limitsFrom, limitsSummary, RESET_LABEL, StatusBadge } from "../keyparts.js";
import { href, navigate } from "../router.js";
import { Confirm, Dialog, DoneFoot, ErrorNote, FormFoot, Link, Switch, Time, UsageBar, useAction, useLoad } from "../ui.js";
import { SecretWithCurl } from "./create-key.js";
import { UsageHistory } from "./usage-history.js";

export function KeyPage(props: { id: string }) {
  const id = useId();
  const { data, error, loading, reload, setData } = useLoad(async () => {
    const [key, usage] = await Promise.all([api.keys.getKey({ id: props.id }), api.keys.getKeyUsage({ id: props.id })]);
    return { key, usage };
  }, [props.id]);
  const [dialog, setDialog] = useState<"edit" | "rotate" | "delete" | null>(null);
  const [toggleError, setToggleError] = useState("");
  const [tick, setTick] = useState(0);

  if (!data) {
    return (
      <section>
        <p>
          <Link href="/keys">← API keys</Link>
        </p>
        <ErrorNote error={error} />
        {loading ? <p role="status">Loading key…</p> : null}
      </section>
    );
  }
  const { key: k, usage: u } = data;
  const l = k.limits;
  const setKey = (key: ApiKey) => setData({ ...data, key });

  return (
    <section aria-labelledby={`${id}-h`}>
      <p class="crumbs">
        <Link href={href("/keys", { gateway: k.gateway })}>← Keys of {k.gateway}</Link>
      </p>
      <div class="page-head">
        <h1 id={`${id}-h`}>
          {k.name} <StatusBadge k={k} />
        </h1>
        <Switch
          checked={k.enabled}
          label={k.enabled ? "Enabled" : "Disabled"}
          showLabel
          onChange={async (v) => {
            setToggleError("");
            try {
              setKey(await api.keys.updateKey({ id: k.id, enabled: v }));
            } catch (e) {
              setToggleError((e as Error).message);
            }
          }}
        />
        <div class="actions">
          <button
            type="button"
            onClick={() => {
              reload();
              setTick((t) => t + 1);
            }}
          >
            Refresh
          </button>
          {!k.legacy ? (
            <button type="button" onClick={() => setDialog("edit")}>
              Edit limits
            </button>
          ) : null}
          <button type="button" onClick={() => setDialog("rotate")}>
            Rotate
          </button>
          <button type="button" class="danger" onClick={() => setDialog("delete")}>
            Delete
          </button>
        </div>
      </div>
      <ErrorNote error={toggleError || error} />
      <dl class="facts">
        <div>
          <dt>Gateway</dt>
          <dd>{k.gateway}</dd>
        </div>
        <div>
          <dt>Prefix</dt>
          <dd class="mono">{k.prefix}…</dd>
        </div>
        <div>
          <dt>Created</dt>
          <dd>
            <Time ts={k.createdAt} />
          </dd>
        </div>
        <div>
          <dt>Last used</dt>
          <dd>
            <Time ts={k.lastUsedAt} empty="Never" rel />
          </dd>
        </div>
        <div>
          <dt>Expires</dt>
          <dd>
            <Time ts={k.expiresAt} empty="Never" rel />
            {expiresSoon(k.expiresAt) ? <span class="badge warn-badge">Within 7 days</span> : null}
          </dd>
        </div>
        <div>
          <dt>Limits</dt>
          <dd>{k.legacy ? "None (legacy key)" : limitsSummary(l)}</dd>
        </div>
      </dl>

      <h2>Overview</h2>
      <div class="cards">
        <div class="card">
          <h3>Current period</h3>
          <p>
            <Time ts={u.periodStart} /> → {u.periodEnd ? <Time ts={u.periodEnd} /> : <span>no reset</span>}
          </p>
          <p class="muted">Reset: {RESET_LABEL[l?.resetPeriod ?? 0]}</p>
        </div>
        <div class="card">
          <h3>Requests</h3>
          <p class="big" data-testid="requests">
            {int(u.requests)} <span class="unit">{u.requests === 1n ? "request" : "requests"}</span>
          </p>
          <UsageBar
            label="Last minute"
            used={u.requestsLastMinute}
            limit={l?.requestsPerMinute}
            text={l?.requestsPerMinute !== undefined ? `${int(u.requestsLastMinute)} of ${int(l.requestsPerMinute)} req/min` : `${int(u.requestsLastMinute)} req/min (no limit)`}
          />
        </div>
        <div class="card">
          <h3>Tokens</h3>
          <p class="big" data-testid="tokens">
            {int(u.totalTokens)} <span class="unit">tokens</span>
          </p>
          <p class="muted">
            {int(u.promptTokens)} prompt · {int(u.completionTokens)} completion tokens
          </p>
          <UsageBar
            label="Token budget"
            used={Number(u.totalTokens)}
            limit={l?.tokenLimit !== undefined ? Number(l.tokenLimit) : undefined}
            text={l?.tokenLimit !== undefined ? `${int(u.totalTokens)} of ${fmtTokens(l.tokenLimit)}` : "no token limit"}
          />
        </div>
        <div class="card">
          <h3>Cost</h3>
          <p class="big" data-testid="cost">
            {usd(u.costUsd)}
          </p>
          <UsageBar
            label="Cost budget"
            used={Number(u.costUsd || 0)}
            limit={l?.costLimitUsd !== undefined ? Number(l.costLimitUsd) : undefined}
            text={l?.costLimitUsd !== undefined ? `${usd(u.costUsd)} of ${usd(l.costLimitUsd)}` : "no cost limit"}
          />
        </div>
        <div class="card">
          <h3>Reserved in flight</h3>
          <p>
            {fmtTokens(u.reservedTokens)} · {usd(u.reservedUsd)}
          </p>
          <p class="muted">Held by requests not yet metered.</p>
        </div>
        <div class="card">
          <h3>Last denial</h3>
          {u.lastDeniedAt ? (
            <>
              <p>
                <Time ts={u.lastDeniedAt} rel />
              </p>
              <p data-testid="deny-reason">{u.lastDenyReason || "no reason recorded"}</p>
            </>
          ) : (
            <p class="muted">Never denied</p>
          )}
        </div>
      </div>

      <UsageHistory keyId={k.id} tick={tick} />

      {dialog === "edit" ? <EditKeyDialog k={k} onClose={() => setDialog(null)} onSaved={(key) => { setKey(key); reload(); }} /> : null}
      {dialog === "rotate" ? <RotateDialog k={k} onClose={() => setDialog(null)} onRotated={reload} /> : null}
      {dialog === "delete" ? (
        <Confirm
          title={`Delete key ${k.name}?`}
          confirmLabel="Delete key"
          danger
          typeToConfirm={k.name}
          onClose={() => setDialog(null)}
          onConfirm={async () => {
            await api.keys.deleteKey({ id: k.id });
            navigate(href("/keys", { gateway: k.gateway }));
          }}
        >
          <p>Deleting is permanent and cannot be undone: the key never authenticates again. Its usage history stays for audit.</p>
        </Confirm>
      ) : null}
    </section>
  );
}

function EditKeyDialog(props: { k: ApiKey; onClose: () => void; onSaved: (k: ApiKey) => void }) {
  const id = useId();
  const [name, setName] = useState(props.k.name);
  const [draft, setDraft] = useState(draftFrom(props.k.limits, props.k.expiresAt));
  const { busy, error, setError, run } = useAction();
  return (
    <Dialog title={`Edit ${props.k.name}`} onClose={props.onClose} wide>
      <form
        noValidate
        onSubmit={(e) => {
          e.preventDefault();
          if (!name.trim()) return setError("Name is required");
          const l = limitsFrom(draft);
          if (typeof l === "string") return setError(l);
          run(async () => {
            const k = await api.keys.updateKey({
              id: props.k.id,
              name: name.trim() !== props.k.name ? name.trim() : undefined,
              limits: l.limits,
              expiresAt: l.expiresAt,
              clearExpiresAt: !draft.expiresOn && !!props.k.expiresAt,
            });
            props.onSaved(k);
            props.onClose();
          });
        }}
      >
        <div class="dialog-body">
          <div class="field">
            <label for={`${id}-name`}>Name</label>
            <input id={`${id}-name`} required autoFocus value={name} onInput={(e) => setName(e.currentTarget.value)} />
          </div>
          <LimitsFields draft={draft} set={setDraft} />
          <ErrorNote error={error} />
        </div>
        <FormFoot onCancel={props.onClose} busy={busy} busyLabel="Saving…" label="Save" />
      </form>
    </Dialog>
  );
}

const GRACE: [string, number][] = [
  ["None: the old secret stops at once", 0],
  ["1 hour", 3_600_000],
  ["24 hours", 86_400_000],
  ["7 days", 7 * 86_400_000],
];

function RotateDialog(props: { k: ApiKey; onClose: () => void; onRotated: () => void }) {
  const id = useId();
  const [grace, setGrace] = useState(3_600_000);
  const [secret, setSecret] = useState("");
  const { busy, error, run } = useAction();
  const close = () => {
    setSecret("");
    props.onClose();
  };
  if (secret) {
    return (
      <Dialog title={`New secret for ${props.k.name}`} onClose={close} wide>
        <div class="dialog-body">
          <SecretWithCurl gateway={props.k.gateway} secret={secret} label="New API key" />
        </div>
        <DoneFoot onDone={close} />
      </Dialog>
    );
  }
  return (
    <Dialog title={`Rotate ${props.k.name}`} onClose={close}>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          run(async () => {
            const r = await api.keys.rotateKey({ id: props.k.id, gracePeriod: grace ? durationFromMs(grace) : undefined });
            setSecret(r.secret);
            props.onRotated();
          });
        }}
      >
        <div class="dialog-body">
          <p>A new secret for the same key: limits and usage carry over. Clients must switch to the new secret before the grace period ends.</p>
          <div class="field">
            <label for={`${id}-grace`}>Old secret keeps working for</label>
            <select id={`${id}-grace`} value={String(grace)} onChange={(e) => setGrace(Number(e.currentTarget.value))}>
              {GRACE.map(([label, ms]) => (
                <option value={String(ms)}>{label}</option>
              ))}
            </select>
          </div>
          <ErrorNote error={error} />
        </div>
        <FormFoot onCancel={close} busy={busy} busyLabel="Rotating…" label="Rotate key" />
      </form>
    </Dialog>
  );
}
