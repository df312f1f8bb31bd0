// CPU and memory of running containers, by id: one sweep watch (in Rust)
// while the engine runs; re-established if it ends while it still runs.
import { api, type Usage } from "./api";
import { engine } from "./engine.svelte";

export const usage = $state<{ byId: Record<string, Usage> }>({ byId: {} });

let watching = false;

export function ensureUsage(): void {
  if (watching || engine.status?.state !== "running") return;
  watching = true;
  api
    .usageWatch((list) => {
      const m: Record<string, Usage> = {};
      for (const u of list) m[u.id] = u;
      usage.byId = m;
    })
    .catch(() => {
      usage.byId = {};
    })
    .finally(() => {
      watching = false;
      setTimeout(ensureUsage, 2000);
    });
}
