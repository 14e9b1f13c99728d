// Sign-in: paste a management token; WhoAmI checks it.
import { useId, useState } from "preact/hooks";
import { signedOutReason, signIn } from "../api.js";
import { ErrorNote, useAction } from "../ui.js";

export function SignInPage() {
  const id = useId();
  const [token, setToken] = useState("");
  const [remember, setRemember] = useState(false);
  const { busy, error, setError, run } = useAction();
  return (
    <main class="signin" id="main">
      <form
        class="card"
        aria-labelledby={`${id}-h`}
        onSubmit={(e) => {
          e.preventDefault();
          if (!token.trim()) return setError("Paste a management token (pcm_…)");
          run(async () => {
            await signIn(token, remember);
            setToken("");
          });
        }}
      >
        <h1 id={`${id}-h`}>Portcullis console</h1>
        {signedOutReason.value ? (
          <p class="notice" role="alert">
            {signedOutReason.value}
          </p>
        ) : null}
        <div class="field">
          <label for={`${id}-t`}>Management token</label>
          <input
            id={`${id}-t`}
            type="password"
            autocomplete="off"
            spellcheck={false}
            placeholder="pcm_…"
            value={token}
            onInput={(e) => setToken(e.currentTarget.value)}
            autoFocus
          />
          <p class="hint">Kept in this page's memory only. Ask an owner for one, or use the token portcullis serve printed at its first start.</p>
        </div>
        <label class="check-label">
          <input type="checkbox" checked={remember} onChange={(e) => setRemember(e.currentTarget.checked)} /> Remember in this tab (sessionStorage, cleared
          when the tab closes)
        </label>
        <ErrorNote error={error} />
        <button type="submit" class="primary" disabled={busy}>
          {busy ? "Checking…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}
