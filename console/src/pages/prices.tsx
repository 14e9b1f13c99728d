// Model prices (USD per million tokens): everyone reads them, admins set and delete them.
import { useId, useState } from "preact/hooks";
import { api, isAdmin } from "../api.js";
import { usd } from "../format.js";
import type { ModelPrice } from "../gen/portcullis/admin/v1/pricing_pb.js";
import { CellLabel, Confirm, Dialog, Empty, ErrorNote, FormFoot, TableHead, useAction, useLoad } from "../ui.js";

export function PricesPage() {
  const id = useId();
  const { data, error, loading, reload } = useLoad(() => api.pricing.listModelPrices({}), []);
  const [editing, setEditing] = useState<ModelPrice | "new" | null>(null);
  const [deleting, setDeleting] = useState<ModelPrice | null>(null);
  const prices = [...(data?.prices ?? [])].sort((a, b) => a.model.localeCompare(b.model));
  return (
    <section aria-labelledby={`${id}-h`}>
      <div class="page-head">
        <h1 id={`${id}-h`}>Model prices</h1>
        {isAdmin.value ? (
          <button type="button" class="primary" onClick={() => setEditing("new")}>
            Set a price
          </button>
        ) : null}
      </div>
      <p class="lead">Used to meter cost. Dated variants (gpt-4o-mini-2024-07-18) use the price of the longest name they extend.</p>
      <ErrorNote error={error} />
      <div class="table-wrap">
        <table class="stack">
          <TableHead cols={["Model", "Input (prompt)", "Output (completion)"]} actions />
          <tbody>
            {prices.map((p) => (
              <tr key={p.model}>
                <th scope="row">
                  <CellLabel>Model</CellLabel>
                  <span class="mono">{p.model}</span>
                </th>
                <td>
                  <CellLabel>Input (prompt)</CellLabel>
                  <span>{usd(p.inputUsdPerMillion)} / 1M tokens</span>
                </td>
                <td>
                  <CellLabel>Output (completion)</CellLabel>
                  <span>{usd(p.outputUsdPerMillion)} / 1M tokens</span>
                </td>
                <td class="row-actions">
                  {isAdmin.value ? (
                    <>
                      <button type="button" onClick={() => setEditing(p)} aria-label={`Edit price of ${p.model}`}>
                        Edit
                      </button>
                      <button type="button" class="danger" onClick={() => setDeleting(p)} aria-label={`Delete price of ${p.model}`}>
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
      {!loading && prices.length === 0 ? <Empty>No prices: usage of every model is counted at 0 USD (keys with a USD limit pay the book's highest prices).</Empty> : null}
      {editing ? <PriceDialog price={editing === "new" ? undefined : editing} onClose={() => setEditing(null)} onSaved={reload} /> : null}
      {deleting ? (
        <Confirm
          title={`Delete the price of ${deleting.model}?`}
          confirmLabel="Delete price"
          danger
          onClose={() => setDeleting(null)}
          onConfirm={async () => {
            await api.pricing.deleteModelPrice({ model: deleting.model });
            reload();
          }}
        >
          <p>Responses from this model will be counted at 0 USD, unless a shorter name it extends has a price.</p>
        </Confirm>
      ) : null}
    </section>
  );
}

function PriceDialog(props: { price?: ModelPrice; onClose: () => void; onSaved: () => void }) {
  const id = useId();
  const [model, setModel] = useState(props.price?.model ?? "");
  const [input, setInput] = useState(props.price?.inputUsdPerMillion ?? "");
  const [output, setOutput] = useState(props.price?.outputUsdPerMillion ?? "");
  const { busy, error, setError, run } = useAction();
  const money = /^\d+(\.\d+)?$/;
  return (
    <Dialog title={props.price ? `Price of ${props.price.model}` : "Set a model price"} onClose={props.onClose}>
      <form
        noValidate
        onSubmit={(e) => {
          e.preventDefault();
          if (!model.trim()) return setError("Model is required, e.g. gpt-4o-mini");
          if (!money.test(input.trim()) || !money.test(output.trim())) return setError("Prices: USD per million tokens, e.g. 0.15");
          run(async () => {
            await api.pricing.setModelPrice({ price: { model: model.trim(), inputUsdPerMillion: input.trim(), outputUsdPerMillion: output.trim() } });
            props.onSaved();
            props.onClose();
          });
        }}
      >
        <div class="dialog-body">
          <div class="field">
            <label for={`${id}-m`}>Model</label>
            <input id={`${id}-m`} required autoFocus={!props.price} readOnly={!!props.price} value={model} placeholder="gpt-4o-mini" onInput={(e) => setModel(e.currentTarget.value)} />
          </div>
          <div class="field">
            <label for={`${id}-i`}>Input, USD per million tokens</label>
            <input id={`${id}-i`} inputMode="decimal" required value={input} placeholder="0.15" onInput={(e) => setInput(e.currentTarget.value)} />
          </div>
          <div class="field">
            <label for={`${id}-o`}>Output, USD per million tokens</label>
            <input id={`${id}-o`} inputMode="decimal" required value={output} placeholder="0.60" onInput={(e) => setOutput(e.currentTarget.value)} />
          </div>
          <ErrorNote error={error} />
        </div>
        <FormFoot onCancel={props.onClose} busy={busy} busyLabel="Saving…" label="Save price" />
      </form>
    </Dialog>
  );
}
