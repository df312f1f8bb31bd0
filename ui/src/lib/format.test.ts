import { describe, expect, it } from "vitest";
import { actionsFor, ago, bytes, cpuText, duration, groupContainers, parseEnv, parsePorts, parseVolumes, shortId, sparkPoints } from "./format";
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

describe("usage and run-dialog helpers", () => {
  it("formats CPU shares", () => {
    expect(cpuText(null)).toBe("—");
    expect(cpuText(3.14159)).toBe("3.1 %");
    expect(cpuText(153.7)).toBe("154 %");
  });
  it("shortens image ids", () => {
    expect(shortId("sha256:0123456789abcdef0123")).toBe("0123456789ab");
  });
  it("scales sparklines to the box", () => {
    expect(sparkPoints([], 100, 10)).toBe("");
    expect(sparkPoints([0, 5, 10], 100, 10)).toBe("0.0,10.0 50.0,5.0 100.0,0.0");
    expect(sparkPoints([5], 100, 10, 10)).toBe("0.0,5.0");
  });
  it("parses ports, volumes and env or says what is wrong", () => {
    expect(parsePorts("8080:80\n5353:53/udp")).toEqual([
      { host: 8080, container: 80, proto: "tcp" },
      { host: 5353, container: 53, proto: "udp" },
    ]);
    expect(() => parsePorts("80")).toThrow(/host:container/);
    expect(() => parsePorts("70000:80")).toThrow(/1 to 65535/);
    expect(parseVolumes("data:/var/lib/x\n/home/me:/src:ro")).toEqual([
      { source: "data", target: "/var/lib/x", read_only: false },
      { source: "/home/me", target: "/src", read_only: true },
    ]);
    expect(() => parseVolumes("data:rel")).toThrow(/source:/);
    expect(parseEnv("A=1\nB=")).toEqual(["A=1", "B="]);
    expect(() => parseEnv("NOPE")).toThrow(/KEY=value/);
  });
});

describe("theme", () => {
  it("follows the OS unless a theme was picked", async () => {
    const { resolveTheme } = await import("./theme");
    expect(resolveTheme("system", true)).toBe("dark");
    expect(resolveTheme("system", false)).toBe("light");
    expect(resolveTheme("light", true)).toBe("light");
    expect(resolveTheme("dark", false)).toBe("dark");
  });
});
