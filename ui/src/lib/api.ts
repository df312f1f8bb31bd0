// Typed calls to the app's commands. Every type comes from ../bindings,
// generated from the Rust types (never written here).
import { Channel, invoke } from "@tauri-apps/api/core";
import type { Status } from "../bindings/Status";
import type { Config } from "../bindings/Config";
import type { ConfigChange } from "../bindings/ConfigChange";
import type { ContainerRow } from "../bindings/ContainerRow";
import type { ContainerAction } from "../bindings/ContainerAction";
import type { ContainerDetail } from "../bindings/ContainerDetail";
import type { LogLine } from "../bindings/LogLine";
import type { UiError } from "../bindings/UiError";

export type { Status, Config, ConfigChange, ContainerRow, ContainerAction, ContainerDetail, LogLine, UiError };

/** Whatever a command threw, as a UiError (code + message). */
export function asUiError(e: unknown): UiError {
  if (e && typeof e === "object" && "code" in e && "message" in e) return e as UiError;
  return { code: "internal", message: String(e), detail: null };
}

async function call<T>(cmd: string, args?: Record<string, unknown>): Promise<T> {
  try {
    return await invoke<T>(cmd, args);
  } catch (e) {
    throw asUiError(e);
  }
}

function channel<T>(on: (v: T) => void): Channel<T> {
  const c = new Channel<T>();
  c.onmessage = on;
  return c;
}

export const api = {
  engineStatus: () => call<Status>("engine_status"),
  engineStart: (progress: (line: string) => void) =>
    call<Status>("engine_start", { progress: channel(progress) }),
  engineStop: (progress: (line: string) => void) =>
    call<string>("engine_stop", { progress: channel(progress) }),
  engineRestart: (progress: (line: string) => void) =>
    call<Status>("engine_restart", { progress: channel(progress) }),
  containersWatch: (onList: (rows: ContainerRow[]) => void) =>
    call<void>("containers_watch", { onList: channel(onList) }),
  containerAction: (id: string, action: ContainerAction) =>
    call<void>("container_action", { id, action }),
  containerInspect: (id: string) => call<ContainerDetail>("container_inspect", { id }),
  logsStream: (
    id: string,
    tail: number | null,
    follow: boolean,
    onLines: (lines: LogLine[]) => void,
    onEnd: (e: UiError | null) => void,
  ) => call<number>("logs_stream", { id, tail, follow, onLines: channel(onLines), onEnd: channel(onEnd) }),
  logsStop: (stream: number) => call<void>("logs_stop", { stream }),
  logsSave: (path: string, text: string) => call<void>("logs_save", { path, text }),
  terminalOpen: (
    id: string,
    cols: number,
    rows: number,
    onOutput: (bytes: number[]) => void,
    onExit: (why: string | null) => void,
  ) => call<number>("terminal_open", { id, cols, rows, onOutput: channel(onOutput), onExit: channel(onExit) }),
  terminalWrite: (terminal: number, data: string) => call<void>("terminal_write", { terminal, data }),
  terminalResize: (terminal: number, cols: number, rows: number) =>
    call<void>("terminal_resize", { terminal, cols, rows }),
  terminalClose: (terminal: number) => call<void>("terminal_close", { terminal }),
  configGet: () => call<Config>("config_get"),
  configSet: (key: string, value: string) => call<ConfigChange>("config_set", { key, value }),
  appQuit: (stopEngine: boolean) => call<void>("app_quit", { stopEngine }),
};
