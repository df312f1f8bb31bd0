// Pure helpers for what the views show; unit-tested in format.test.ts.
import type { ContainerRow } from "../bindings/ContainerRow";

/** "3 d 4 h", "2 h 5 min", "42 s". */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d > 0) return `${d} d ${h} h`;
  if (h > 0) return `${h} h ${m} min`;
  if (m > 0) return `${m} min`;
  return `${s} s`;
}

/** "12 s ago", "5 min ago", "3 h ago", "2 d ago" from unix seconds. */
export function ago(unix: number, nowMs: number = Date.now()): string {
  const s = Math.max(0, nowMs / 1000 - unix);
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** 1536 → "1.5 KiB". */
export function bytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

/** A group of the container list: a compose project, or the loose ones. */
export interface Group {
  project: string | null;
  rows: ContainerRow[];
}

/**
 * Filters by a case-insensitive substring of name, image or project, and
 * groups compose projects (alphabetically) ahead of loose containers; rows
 * keep their order inside a group.
 */
export function groupContainers(rows: ContainerRow[], filter: string): Group[] {
  const f = filter.trim().toLowerCase();
  const hit = (r: ContainerRow) =>
    !f ||
    r.name.toLowerCase().includes(f) ||
    r.image.toLowerCase().includes(f) ||
    (r.project ?? "").toLowerCase().includes(f);
  const byProject = new Map<string, ContainerRow[]>();
  const loose: ContainerRow[] = [];
  for (const r of rows) {
    if (!hit(r)) continue;
    if (r.project) {
      const g = byProject.get(r.project) ?? [];
      g.push(r);
      byProject.set(r.project, g);
    } else loose.push(r);
  }
  const groups: Group[] = [...byProject.keys()].sort().map((p) => ({ project: p, rows: byProject.get(p)! }));
  if (loose.length) groups.push({ project: null, rows: loose });
  return groups;
}

/** Which actions make sense for a container in `state`. */
export function actionsFor(state: string): { start: boolean; stop: boolean; pause: boolean; unpause: boolean } {
  return {
    start: state === "created" || state === "exited" || state === "dead",
    stop: state === "running" || state === "restarting" || state === "paused",
    pause: state === "running",
    unpause: state === "paused",
  };
}

/** "12.3 %" for a CPU share, "—" before it is known. */
export function cpuText(percent: number | null | undefined): string {
  if (percent == null || !Number.isFinite(percent)) return "—";
  return `${percent < 10 ? percent.toFixed(1) : Math.round(percent)} %`;
}

/** "sha256:0123456789abcdef…" → "0123456789ab". */
export function shortId(id: string): string {
  return id.replace(/^sha256:/, "").slice(0, 12);
}

/**
 * An SVG polyline's points for `values` in a `w`×`h` box, oldest at the
 * left; `max` is the top (at least the largest value, never 0).
 */
export function sparkPoints(values: number[], w: number, h: number, max?: number): string {
  if (values.length === 0) return "";
  const top = Math.max(max ?? 0, ...values, 1e-9);
  const step = values.length > 1 ? w / (values.length - 1) : 0;
  return values
    .map((v, i) => `${(i * step).toFixed(1)},${(h - (Math.max(0, v) / top) * h).toFixed(1)}`)
    .join(" ");
}

/** Parses the run dialog's "8080:80", "5353:53/udp" lines. */
export function parsePorts(text: string): { host: number; container: number; proto: string }[] {
  const out: { host: number; container: number; proto: string }[] = [];
  for (const raw of text.split(/[\n,]/)) {
    const s = raw.trim();
    if (!s) continue;
    const m = /^(\d{1,5}):(\d{1,5})(?:\/(tcp|udp))?$/.exec(s);
    if (!m) throw new Error(`"${s}" is not host:container (like 8080:80 or 5353:53/udp)`);
    const [host, container] = [Number(m[1]), Number(m[2])];
    if (host < 1 || host > 65535 || container < 1 || container > 65535) throw new Error(`"${s}": ports are 1 to 65535`);
    out.push({ host, container, proto: m[3] ?? "tcp" });
  }
  return out;
}

/** Parses "source:/target[:ro]" lines (a host path or a volume name). */
export function parseVolumes(text: string): { source: string; target: string; read_only: boolean }[] {
  const out: { source: string; target: string; read_only: boolean }[] = [];
  for (const raw of text.split("\n")) {
    const s = raw.trim();
    if (!s) continue;
    const parts = s.split(":");
    const ro = parts.length === 3 && parts[2] === "ro";
    if (!(parts.length === 2 || ro) || !parts[0] || !parts[1].startsWith("/"))
      throw new Error(`"${s}" is not source:/path/in/container[:ro]`);
    out.push({ source: parts[0], target: parts[1], read_only: ro });
  }
  return out;
}

/** Parses KEY=value lines. */
export function parseEnv(text: string): string[] {
  const out: string[] = [];
  for (const raw of text.split("\n")) {
    const s = raw.trim();
    if (!s) continue;
    if (!/^[A-Za-z_][A-Za-z0-9_.-]*=/.test(s)) throw new Error(`"${s}" is not KEY=value`);
    out.push(s);
  }
  return out;
}
