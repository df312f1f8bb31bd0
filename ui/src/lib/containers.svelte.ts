// The live container list: one watch (Docker's event stream, in Rust)
// while the engine runs; re-established if it ends while it still runs.
import { api, asUiError, type ContainerRow, type UiError } from "./api";
import { engine } from "./engine.svelte";

export const containers = $state<{ rows: ContainerRow[]; loaded: boolean; error: UiError | null }>({
  rows: [],
  loaded: false,
  error: null,
});

let watching = false;

export function ensureWatch(): void {
  if (watching || engine.status?.state !== "running") return;
  watching = true;
  api
    .containersWatch((rows) => {
      containers.rows = rows;
      containers.loaded = true;
      containers.error = null;
    })
    .catch((e) => {
      containers.error = asUiError(e);
    })
    .finally(() => {
      watching = false;
      // Back after a moment if the engine still runs (a Docker restart).
      setTimeout(ensureWatch, 1000);
    });
}

/** Forget the list when the engine stops. */
export function engineStopped(): void {
  containers.rows = [];
  containers.loaded = false;
}
