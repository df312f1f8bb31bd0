// Light or dark: the OS's choice unless the user picked one in Settings.
// "system" follows prefers-color-scheme live; the choice is kept in
// localStorage. The CSS keys on <html data-theme>.
export type Theme = "system" | "light" | "dark";
const KEY = "berth.theme";
const media = typeof matchMedia === "function" ? matchMedia("(prefers-color-scheme: dark)") : null;

export function storedTheme(): Theme {
  const t = typeof localStorage === "object" ? localStorage.getItem(KEY) : null;
  return t === "light" || t === "dark" ? t : "system";
}

/** What `choice` shows now. */
export function resolveTheme(choice: Theme, osDark: boolean): "light" | "dark" {
  return choice === "system" ? (osDark ? "dark" : "light") : choice;
}

function paint(): void {
  document.documentElement.dataset.theme = resolveTheme(storedTheme(), media?.matches ?? false);
}

export function setTheme(t: Theme): void {
  if (t === "system") localStorage.removeItem(KEY);
  else localStorage.setItem(KEY, t);
  paint();
}

export function initTheme(): void {
  paint();
  media?.addEventListener("change", paint);
}
