// Messages for failed actions: shown at the bottom, each with its code.
import type { UiError } from "../bindings/UiError";

export interface Toast {
  id: number;
  error: UiError;
}

let next = 1;
export const toasts = $state<{ list: Toast[] }>({ list: [] });

export function showError(error: UiError): void {
  const id = next++;
  toasts.list.push({ id, error });
  setTimeout(() => dismiss(id), 12_000);
}

export function dismiss(id: number): void {
  toasts.list = toasts.list.filter((t) => t.id !== id);
}
