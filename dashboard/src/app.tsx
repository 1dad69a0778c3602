// The shell: sign-in gate, navigation, and a hash router (#/workers, #/tasks, #/tasks/{id}, ...).
import { useEffect, useState } from "preact/hooks";
import { auth, session } from "./api.js";
import { SignIn } from "./pages/signin.js";
import { Workers } from "./pages/workers.js";
import { Tasks } from "./pages/tasks.js";
import { TaskDetail } from "./pages/task.js";
import { Checkpoints } from "./pages/checkpoints.js";
import { Activity } from "./pages/activity.js";

function useHash(): string {
  const [hash, setHash] = useState(window.location.hash || "#/workers");
  useEffect(() => {
    const on = () => setHash(window.location.hash || "#/workers");
    window.addEventListener("hashchange", on);
    return () => window.removeEventListener("hashchange", on);
  }, []);
  return hash;
}

function useSession(): boolean {
  const [signedIn, setSignedIn] = useState(session.signedIn);
  useEffect(() => session.subscribe(() => setSignedIn(session.signedIn)), []);
  return signedIn;
}

const NAV = [
  ["#/workers", "Workers"],
  ["#/tasks", "Tasks"],
  ["#/checkpoints", "Checkpoints"],
  ["#/activity", "Activity"],
] as const;

export function App() {
  const signedIn = useSession();
  const hash = useHash();
  if (!signedIn) return <SignIn />;
  const [, page, id] = hash.split("/");
  let body;
  if (page === "tasks" && id) body = <TaskDetail id={decodeURIComponent(id)} key={id} />;
  else if (page === "tasks") body = <Tasks />;
  else if (page === "checkpoints") body = <Checkpoints />;
  else if (page === "activity") body = <Activity />;
  else body = <Workers />;
  const signOut = async () => {
    // Best effort: end the session on the server too; the tokens are dropped either way.
    await auth.logout({}).catch(() => undefined);
    session.set(undefined);
  };
  return (
    <div class="shell">
      <header>
        <strong class="brand">maw</strong>
        <nav aria-label="Main">
          {NAV.map(([href, label]) => (
            <a href={href} class={hash.startsWith(href) ? "active" : ""} aria-current={hash.startsWith(href) ? "page" : undefined}>
              {label}
            </a>
          ))}
        </nav>
        <span class="who" data-testid="who">
          {session.user?.displayName || session.user?.name}
        </span>
        <button type="button" onClick={signOut}>
          Sign out
        </button>
      </header>
      <main>{body}</main>
    </div>
  );
}
