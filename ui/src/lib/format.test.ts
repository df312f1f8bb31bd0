import { describe, expect, it } from "vitest";
import { actionsFor, ago, bytes, duration, groupContainers } from "./format";
import type { ContainerRow } from "../bindings/ContainerRow";

const row = (name: string, project: string | null = null, image = "img"): ContainerRow => ({
  id: name,
  name,
  image,
  state: "running",
  status: "Up",
  health: null,
  ports: [],
  created: 0,
  project,
  service: null,
  command: "",
});

describe("format", () => {
  it("says durations the short way", () => {
    expect(duration(42)).toBe("42 s");
    expect(duration(125)).toBe("2 min");
    expect(duration(2 * 3600 + 300)).toBe("2 h 5 min");
    expect(duration(3 * 86400 + 4 * 3600)).toBe("3 d 4 h");
  });
  it("says how long ago", () => {
    expect(ago(1000, 1012_000)).toBe("12 s ago");
    expect(ago(0, 3 * 3600_000)).toBe("3 h ago");
  });
  it("says sizes in binary units", () => {
    expect(bytes(512)).toBe("512 B");
    expect(bytes(1536)).toBe("1.5 KiB");
    expect(bytes(300 * 1024 * 1024)).toBe("300 MiB");
  });
});

describe("groupContainers", () => {
  const rows = [row("web-1", "shop"), row("solo"), row("db-1", "shop", "postgres"), row("api-1", "alpha")];
  it("puts compose projects first, alphabetically, then loose containers", () => {
    const g = groupContainers(rows, "");
    expect(g.map((x) => x.project)).toEqual(["alpha", "shop", null]);
    expect(g[1].rows.map((r) => r.name)).toEqual(["web-1", "db-1"]);
  });
  it("filters by name, image or project, ignoring case", () => {
    expect(groupContainers(rows, "WEB").flatMap((x) => x.rows.map((r) => r.name))).toEqual(["web-1"]);
    expect(groupContainers(rows, "postgres").flatMap((x) => x.rows.map((r) => r.name))).toEqual(["db-1"]);
    expect(groupContainers(rows, "shop").flatMap((x) => x.rows.map((r) => r.name))).toEqual(["web-1", "db-1"]);
    expect(groupContainers(rows, "nothing")).toEqual([]);
  });
  it("offers only the actions a state allows", () => {
    expect(actionsFor("running")).toEqual({ start: false, stop: true, pause: true, unpause: false });
    expect(actionsFor("exited")).toEqual({ start: true, stop: false, pause: false, unpause: false });
    expect(actionsFor("paused")).toEqual({ start: false, stop: true, pause: false, unpause: true });
  });
});
