import { useState } from "preact/hooks";
import { auth, session } from "../api.js";
import { problem, type Problem } from "../errors.js";
import { ErrorBanner, FieldError } from "../ui.js";

export function SignIn() {
  const [username, setUsername] = useState("");
  const [password, setPassword] = useState("");
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState<Problem>();
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setErr(undefined);
    try {
      const reply = await auth.login({ username, password });
      session.set(reply.tokens, reply.user);
    } catch (error) {
      setErr(problem(error));
    } finally {
      setBusy(false);
    }
  };
  return (
    <form class="signin card" onSubmit={submit} aria-label="Sign in">
      <h1>Sign in to maw</h1>
      <ErrorBanner problem={err} />
      <label>
        User name
        <input name="username" autoFocus autoComplete="username" value={username} onInput={(e) => setUsername(e.currentTarget.value)} />
      </label>
      <FieldError problem={err} field="username" />
      <label>
        Password
        <input name="password" type="password" autoComplete="current-password" value={password} onInput={(e) => setPassword(e.currentTarget.value)} />
      </label>
      <FieldError problem={err} field="password" />
      <button type="submit" disabled={busy}>
        {busy ? "Signing in…" : "Sign in"}
      </button>
    </form>
  );
}
