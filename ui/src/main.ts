import { mount } from "svelte";
import "./app.css";
import App from "./App.svelte";
import { initTheme } from "./lib/theme";

initTheme();

const app = mount(App, { target: document.getElementById("app")! });

// When the first frame with the app in it was painted (two animation
// frames after mounting), for the start-up figure in docs/benchmarks.md.
requestAnimationFrame(() =>
  requestAnimationFrame(() => {
    (window as unknown as { __berthFirstPaint: number }).__berthFirstPaint = Date.now();
  }),
);

export default app;
