// The Create API key popup: name (required), optional limits and expiration; on success the
// secret is shown once with a copy button and a ready curl, both dropped when the dialog closes.
import { useId, useState } from "preact/hooks";
import { api } from "../api.js";
import { KeyLocation } from "../gen/portcullis/admin/v1/gateways_pb.js";
import { gatewayByName } from "../gateways-store.js";
import { draftFrom, LimitsFields, limitsFrom } from "../keyparts.js";
import { CopyButton, Dialog, DoneFoot, ErrorNote, FormFoot, SecretOnce, useAction } from "../ui.js";

/** A curl that calls the gateway through Envoy with `secret` where the gateway wants it. */
export function curlFor(gatewayName: string, baseUrl: string, secret: string): string {
  const gw = gatewayByName(gatewayName);
  const keyName = gw?.inboundAuth?.keyName || "x-api-key";
  const inQuery = gw?.inboundAuth?.location === KeyLocation.QUERY;
  const base = (baseUrl.trim() || "https://llm.example.com").replace(/\/+$/, "");
  const url = `${base}/v1/chat/completions${inQuery ? `?${encodeURIComponent(keyName)}=${secret}` : ""}`;
  const lines = [`curl '${url}'`];
  if (!inQuery) lines.push(`  -H '${keyName}: ${secret}'`);
  lines.push(`  -H 'content-type: application/json'`);
  lines.push(`  -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}'`);
  return lines.join(" \\\n");
}

export function SecretWithCurl(props: { gateway: string; secret: string; label: string }) {
  const id = useId();
  const [base, setBase] = useState("");
  const curl = curlFor(props.gateway, base, props.secret);
  return (
    <>
      <SecretOnce secret={props.secret} label={props.label} />
      <div class="field">
        <label for={`${id}-base`}>Gateway URL (where Envoy serves {props.gateway})</label>
        <input id={`${id}-base`} type="url" placeholder="https://llm.example.com" value={base} onInput={(e) => setBase(e.currentTarget.value)} />
      </div>
      <div class="field">
        <span class="label" id={`${id}-curl`}>
          Try it
        </span>
        <pre class="curl" aria-labelledby={`${id}-curl`}>
          <code>{curl}</code>
        </pre>
        <CopyButton text={curl} label="Copy curl command" />
      </div>
    </>
  );
}

export function CreateKeyDialog(props: { gateway: string; onClose: () => void; onCreated: () => void }) {
  const id = useId();
  const [name, setName] = useState("");
  const [draft, setDraft] = useState(draftFrom(undefined, undefined));
  const [secret, setSecret] = useState<{ secret: string; name: string } | null>(null);
  const { busy, error, setError, run } = useAction();

  const close = () => {
    setSecret(null);
    props.onClose();
  };

  if (secret) {
    return (
      <Dialog title={`Key ${secret.name} created`} onClose={close} wide>
        <div class="dialog-body">
          <SecretWithCurl gateway={props.gateway} secret={secret.secret} label="API key" />
        </div>
        <DoneFoot onDone={close} />
      </Dialog>
    );
  }

  return (
    <Dialog title="Create API key" onClose={close} wide>
      <form
        noValidate
        onSubmit={(e) => {
          e.preventDefault();
          if (!name.trim()) return setError("Name is required, e.g. token-user01");
          const l = limitsFrom(draft);
          if (typeof l === "string") return setError(l);
          run(async () => {
            const r = await api.keys.createKey({ gateway: props.gateway, name: name.trim(), limits: l.limits, expiresAt: l.expiresAt });
            setSecret({ secret: r.secret, name: r.key?.name ?? name });
            props.onCreated();
          });
        }}
      >
        <div class="dialog-body">
          <p class="muted">
            For gateway <strong>{props.gateway}</strong>.
          </p>
          <div class="field">
            <label for={`${id}-name`}>
              Name <span class="req">(required)</span>
            </label>
            <input
              id={`${id}-name`}
              required
              aria-required="true"
              autoFocus
              autocomplete="off"
              placeholder="token-user01"
              value={name}
              onInput={(e) => setName(e.currentTarget.value)}
            />
            <p class="hint">Unique within the gateway; helps you manage keys, e.g. token-user01, token-user02.</p>
          </div>
          <LimitsFields draft={draft} set={setDraft} />
          <ErrorNote error={error} />
        </div>
        <FormFoot onCancel={close} busy={busy} busyLabel="Creating…" label="Create" />
      </form>
    </Dialog>
  );
}
