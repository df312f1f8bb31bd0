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
import type { ImageRow } from "../bindings/ImageRow";
import type { Removed } from "../bindings/Removed";
import type { HistoryRow } from "../bindings/HistoryRow";
import type { PullProgress } from "../bindings/PullProgress";
import type { RunSpec } from "../bindings/RunSpec";
import type { VolumeRow } from "../bindings/VolumeRow";
import type { VolumeListing } from "../bindings/VolumeListing";
import type { Usage } from "../bindings/Usage";
import type { StatsPoint } from "../bindings/StatsPoint";
import type { EngineUsage } from "../bindings/EngineUsage";
import type { Bundle } from "../bindings/Bundle";
import type { ResetPreview } from "../bindings/ResetPreview";

export type {
  Status, Config, ConfigChange, ContainerRow, ContainerAction, ContainerDetail, LogLine, UiError,
  ImageRow, Removed, HistoryRow, PullProgress, RunSpec, VolumeRow, VolumeListing, Usage, StatsPoint,
  EngineUsage, Bundle, ResetPreview,
};

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
  streamStop: (stream: number) => call<void>("stream_stop", { stream }),
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
  usageWatch: (onUsage: (u: Usage[]) => void) => call<void>("usage_watch", { onUsage: channel(onUsage) }),
  statsStream: (id: string, onPoint: (p: StatsPoint) => void) =>
    call<number>("stats_stream", { id, onPoint: channel(onPoint) }),
  imagesList: () => call<ImageRow[]>("images_list"),
  imageRemove: (reference: string, force: boolean) => call<Removed>("image_remove", { reference, force }),
  imagesPrune: () => call<Removed>("images_prune"),
  imageHistory: (reference: string) => call<HistoryRow[]>("image_history", { reference }),
  imagePull: (reference: string, onProgress: (p: PullProgress) => void) =>
    call<PullProgress>("image_pull", { reference, onProgress: channel(onProgress) }),
  imageRun: (spec: RunSpec) => call<string>("image_run", { spec }),
  volumesList: () => call<VolumeRow[]>("volumes_list"),
  volumeCreate: (name: string) => call<VolumeRow>("volume_create", { name }),
  volumeRemove: (name: string) => call<void>("volume_remove", { name }),
  volumesPrune: () => call<Removed>("volumes_prune"),
  volumeBrowse: (name: string, path: string) => call<VolumeListing>("volume_browse", { name, path }),
  engineUsage: () => call<EngineUsage>("engine_usage"),
  consoleLog: () => call<string>("console_log"),
  diagnosticsSave: (path: string) => call<Bundle>("diagnostics_save", { path }),
  resetPreview: () => call<ResetPreview>("reset_preview"),
  engineReset: (wipeData: boolean, progress: (line: string) => void) =>
    call<string[]>("engine_reset", { wipeData, progress: channel(progress) }),
};
