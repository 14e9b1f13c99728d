// Usage history of a key or a gateway. Needs GetUsageHistory (issue 10's API side).
export function UsageHistory(_props: { keyId?: string; gateway?: string }) {
  return (
    <section class="history">
      <h2>Usage history</h2>
      <p class="muted">The server does not report usage history yet.</p>
    </section>
  );
}
