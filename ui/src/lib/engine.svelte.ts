// The engine's state as every view sees it, refreshed while the app runs.
import { api, asUiError, type Status, type UiError } from "./api";

export const engine = $state<{
  status: Status | null;
  busy: "starting" | "stopping" | "restarting" | null;
  progress: string[];
  error: UiError | null;
}>({ status: null, busy: null, progress: [], error: null });

export async function refresh(): Promise<void> {
  try {
    engine.status = await api.engineStatus();
  } catch (e) {
    engine.error = asUiError(e);
  }
}

function onProgress(line: string) {
  engine.progress.push(line);
}

async function run(kind: "starting" | "stopping" | "restarting", f: () => Promise<unknown>) {
  if (engine.busy) return;
  engine.busy = kind;
  engine.progress = [];
  engine.error = null;
  try {
    await f();
  } catch (e) {
    engine.error = asUiError(e);
  } finally {
    engine.busy = null;
    await refresh();
  }
}

export const startEngine = () => run("starting", () => api.engineStart(onProgress));
export const stopEngine = () => run("stopping", () => api.engineStop(onProgress));
export const restartEngine = () => run("restarting", () => api.engineRestart(onProgress));

/** What the state badge says. */
export function shownState(): string {
  if (engine.busy) return engine.busy;
  if (engine.error && engine.status?.state !== "running") return "error";
  return engine.status?.state ?? "stopped";
}

let timer: ReturnType<typeof setInterval> | null = null;
export function startPolling(): void {
  if (timer) return;
  void refresh();
  timer = setInterval(() => void refresh(), 2000);
}
