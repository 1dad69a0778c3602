// Shared bits of UI: link state badge, error banner, field messages.
import type { ComponentChildren } from "preact";
import type { Problem } from "./errors.js";
import type { LinkState } from "./watch.js";

export function LinkBadge({ state }: { state: LinkState }) {
  const label = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…" }[state];
  return (
    <span class={`link link-${state}`} role="status" aria-live="polite" data-testid="link-state" data-state={state}>
      {label}
    </span>
  );
}

export function ErrorBanner({ problem, onRetry }: { problem: Problem | undefined; onRetry?: () => void }) {
  if (!problem) return null;
  return (
    <div class="error" role="alert" data-testid="error">
      {problem.message}
      {onRetry && (
        <button type="button" class="link-button" onClick={onRetry}>
          Retry
        </button>
      )}
    </div>
  );
}

/** The server's message about one field (and, with `prefix`, about anything under it). */
export function FieldError({ problem, field, prefix }: { problem: Problem | undefined; field: string; prefix?: boolean }) {
  if (!problem) return null;
  const messages = Object.entries(problem.fields)
    .filter(([f]) => f === field || (prefix && (f.startsWith(`${field}.`) || f.startsWith(`${field}[`))))
    .map(([f, m]) => (f === field ? m : `${f.slice(field.length + 1)}: ${m}`));
  if (!messages.length) return null;
  return (
    <div class="field-error" role="alert" data-field={field}>
      {messages.join("; ")}
    </div>
  );
}

export function Loading({ children }: { children?: ComponentChildren }) {
  return (
    <div class="loading" aria-busy="true">
      {children ?? "Loading…"}
    </div>
  );
}
