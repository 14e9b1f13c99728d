// Shared pieces: times, dialogs, confirmations, toggles, usage bars, secrets shown once.
import type { ComponentChildren } from "preact";
import { useCallback, useEffect, useId, useRef, useState } from "preact/hooks";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { errorText } from "./api.js";
import { localTime, relative, toDate, utcTitle } from "./format.js";
import { navigate } from "./router.js";

/** A time in the browser's zone; the UTC time on hover. */
export function Time(props: { ts?: Timestamp; empty?: string; rel?: boolean; dateOnly?: boolean }) {
  const d = toDate(props.ts);
  if (!d) return <span class="muted">{props.empty ?? "—"}</span>;
  const text = localTime(d, !props.dateOnly);
  return (
    <time class={props.dateOnly ? "date" : undefined} dateTime={d.toISOString()} title={utcTitle(d)}>
      {text}
      {props.rel ? <span class="muted"> ({relative(d)})</span> : null}
    </time>
  );
}

/** An in-app link (History API), opened normally with a modifier key. */
export function Link(props: { href: string; children: ComponentChildren; class?: string; "aria-current"?: "page" | undefined }) {
  return (
    <a
      href={props.href}
      class={props.class}
      aria-current={props["aria-current"]}
      onClick={(e) => {
        if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
        e.preventDefault();
        navigate(props.href);
      }}
    >
      {props.children}
    </a>
  );
}

/** A modal dialog (native <dialog>: focus kept inside, Escape closes; opening focuses the field
 * marked autoFocus, else the first control; closing returns the focus to what opened it). */
export function Dialog(props: {
  title: string;
  onClose: () => void;
  children: ComponentChildren;
  wide?: boolean;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  const id = useId();
  // What had the focus when the dialog opened (read before it renders), for when it closes: a
  // dialog removed from the page does not give the focus back by itself.
  const [opener] = useState(() => document.activeElement);
  // close() below queues a "close" event: once unmounted, it must not close the next dialog.
  const live = useRef(true);
  useEffect(() => {
    const d = ref.current!;
    if (!d.open) d.showModal();
    return () => {
      live.current = false;
      if (d.open) d.close();
      if (opener instanceof HTMLElement && opener !== document.body && opener.isConnected) opener.focus();
    };
  }, []);
  return (
    <dialog
      ref={ref}
      class={props.wide ? "wide" : undefined}
      aria-labelledby={`${id}-title`}
      onClose={() => live.current && props.onClose()}
      onCancel={(e) => {
        e.preventDefault();
        props.onClose();
      }}
    >
      <header class="dialog-head">
        <h2 id={`${id}-title`}>{props.title}</h2>
        <button type="button" class="icon" aria-label="Close" onClick={() => props.onClose()}>
          ×
        </button>
      </header>
      {props.children}
    </dialog>
  );
}

export function ErrorNote(props: { error: string }) {
  if (!props.error) return null;
  return (
    <p class="error" role="alert">
      {props.error}
    </p>
  );
}

/** Runs an async action with a busy flag and a readable error. */
export function useAction() {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState("");
  const run = useCallback(async (f: () => Promise<void>) => {
    setBusy(true);
    setError("");
    try {
      await f();
    } catch (e) {
      setError(errorText(e));
    } finally {
      setBusy(false);
    }
  }, []);
  return { busy, error, setError, run };
}

/** Loads data for a view; reloads when `deps` change or on `reload()`. */
export function useLoad<T>(load: () => Promise<T>, deps: unknown[]) {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState("");
  const [loading, setLoading] = useState(true);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    setLoading(true);
    load().then(
      (d) => {
        if (!live) return;
        setData(d);
        setError("");
        setLoading(false);
      },
      (e) => {
        if (!live) return;
        setError(errorText(e));
        setLoading(false);
      },
    );
    return () => {
      live = false;
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [...deps, tick]);
  return { data, error, loading, reload: () => setTick((t) => t + 1), setData };
}

/** A dialog form's footer: Cancel, and a submit button that reads `busyLabel` while busy. */
export function FormFoot(props: { onCancel: () => void; busy: boolean; busyLabel: string; label: string; danger?: boolean; disabled?: boolean }) {
  return (
    <footer class="dialog-foot">
      <button type="button" onClick={props.onCancel}>
        Cancel
      </button>
      <button type="submit" class={props.danger ? "danger" : "primary"} disabled={props.disabled || props.busy}>
        {props.busy ? props.busyLabel : props.label}
      </button>
    </footer>
  );
}

/** A result dialog's footer (e.g. after a secret shown once): a single Done button. */
export function DoneFoot(props: { onDone: () => void }) {
  return (
    <footer class="dialog-foot">
      <button type="button" class="primary" onClick={props.onDone}>
        Done
      </button>
    </footer>
  );
}

/** A table's header row: one column header per entry; `actions` adds a last, visually hidden "Actions" one. */
export function TableHead(props: { cols: ComponentChildren[]; actions?: boolean }) {
  return (
    <thead>
      <tr>
        {props.cols.map((c, i) => (
          <th key={i} scope="col">
            {c}
          </th>
        ))}
        {props.actions ? (
          <th scope="col">
            <span class="sr-only">Actions</span>
          </th>
        ) : null}
      </tr>
    </thead>
  );
}

/**
 * A cell's column name, shown before its value only where a table is laid out as cards (narrow
 * screens, `table.stack`; the column headers are hidden there) and hidden (display: none, so
 * also from screen readers) where the table has its column headers.
 */
export function CellLabel(props: { children: ComponentChildren }) {
  return <span class="cell-label">{props.children}</span>;
}

/** A muted "Loading …" status line. */
export function Loading(props: { children: ComponentChildren }) {
  return (
    <p class="muted" role="status">
      {props.children}
    </p>
  );
}

/** A confirmation; with `typeToConfirm`, the operator must type that text first. */
export function Confirm(props: {
  title: string;
  children: ComponentChildren;
  confirmLabel: string;
  danger?: boolean;
  typeToConfirm?: string;
  onConfirm: () => Promise<void>;
  onClose: () => void;
}) {
  const { busy, error, run } = useAction();
  const [typed, setTyped] = useState("");
  const id = useId();
  const ok = !props.typeToConfirm || typed === props.typeToConfirm;
  return (
    <Dialog title={props.title} onClose={props.onClose}>
      <form
        method="dialog"
        onSubmit={(e) => {
          e.preventDefault();
          if (ok) run(async () => { await props.onConfirm(); props.onClose(); });
        }}
      >
        <div class="dialog-body">
          {props.children}
          {props.typeToConfirm ? (
            <div class="field">
              <label for={`${id}-confirm`}>
                Type <strong class="mono">{props.typeToConfirm}</strong> to confirm
              </label>
              <input
                id={`${id}-confirm`}
                autoFocus
                autocomplete="off"
                spellcheck={false}
                value={typed}
                onInput={(e) => setTyped(e.currentTarget.value)}
              />
            </div>
          ) : null}
          <ErrorNote error={error} />
        </div>
        <FormFoot onCancel={props.onClose} busy={busy} busyLabel="Working…" label={props.confirmLabel} danger={props.danger} disabled={!ok} />
      </form>
    </Dialog>
  );
}

/** An on/off switch with an accessible name. */
export function Switch(props: { checked: boolean; label: string; onChange: (v: boolean) => void; disabled?: boolean; showLabel?: boolean }) {
  return (
    <button
      type="button"
      role="switch"
      class="switch"
      aria-checked={props.checked}
      aria-label={props.showLabel ? undefined : props.label}
      disabled={props.disabled}
      onClick={() => props.onChange(!props.checked)}
    >
      <span class="track" aria-hidden="true">
        <span class="thumb" />
      </span>
      {props.showLabel ? <span>{props.label}</span> : null}
    </button>
  );
}

/** Usage against a limit: a bar (amber past 80 %, red at 100 %) and the numbers with units. */
export function UsageBar(props: { label: string; used: number; limit?: number; text: string }) {
  const pct = props.limit && props.limit > 0 ? Math.min(100, (props.used / props.limit) * 100) : undefined;
  const level = pct === undefined ? "" : pct >= 100 ? "full" : pct >= 80 ? "high" : "";
  return (
    <div class="usage">
      <div class="usage-text">
        <span class="usage-label">{props.label}</span> <span>{props.text}</span>
      </div>
      {pct !== undefined ? (
        <div
          class={`bar ${level}`}
          role="meter"
          aria-label={props.label}
          aria-valuemin={0}
          aria-valuemax={100}
          aria-valuenow={Math.round(pct)}
          aria-valuetext={props.text}
        >
          <span style={{ width: `${pct}%` }} />
        </div>
      ) : null}
    </div>
  );
}

/** A secret shown once, with a copy button. */
export function SecretOnce(props: { secret: string; label: string }) {
  const id = useId();
  const [copied, setCopied] = useState(false);
  return (
    <div class="secret">
      <label for={id}>{props.label}</label>
      <div class="copy-row">
        <input id={id} class="mono" readOnly value={props.secret} onFocus={(e) => e.currentTarget.select()} />
        <CopyButton text={props.secret} onCopied={() => setCopied(true)} label={`Copy ${props.label.toLowerCase()}`} />
      </div>
      <p class="warn" role="status">
        {copied ? "Copied. " : ""}Store it now: it is shown this once and cannot be shown again.
      </p>
    </div>
  );
}

export function CopyButton(props: { text: string; label?: string; onCopied?: () => void }) {
  const [done, setDone] = useState(false);
  return (
    <button
      type="button"
      aria-label={props.label}
      onClick={async () => {
        try {
          await navigator.clipboard.writeText(props.text);
        } catch {
          // No clipboard permission (plain http, headless): copy through a selected field.
          const t = document.createElement("textarea");
          t.value = props.text;
          document.body.appendChild(t);
          t.select();
          document.execCommand("copy");
          t.remove();
        }
        setDone(true);
        props.onCopied?.();
        setTimeout(() => setDone(false), 2000);
      }}
    >
      {done ? "Copied" : "Copy"}
    </button>
  );
}

export function Empty(props: { children: ComponentChildren }) {
  return <p class="empty">{props.children}</p>;
}
