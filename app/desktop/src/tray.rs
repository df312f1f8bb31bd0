//! The tray icon: the engine's state, Open, Start/Stop and Quit. It stays
//! when the window closes, so the engine keeps running without a window.

use berth_core::status::VmState;
use tauri::menu::{Menu, MenuItem, PredefinedMenuItem};
use tauri::tray::TrayIconBuilder;
use tauri::{AppHandle, Emitter, Manager, Runtime};

pub const TRAY_ID: &str = "berth";

/// The menu items whose text or state follow the engine.
pub struct TrayItems<R: Runtime> {
    pub state: MenuItem<R>,
    pub start: MenuItem<R>,
    pub stop: MenuItem<R>,
}

impl<R: Runtime> std::fmt::Debug for TrayItems<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrayItems").finish_non_exhaustive()
    }
}

pub fn create<R: Runtime>(app: &AppHandle<R>) -> tauri::Result<TrayItems<R>> {
    let state = MenuItem::with_id(app, "state", "Berth: checking…", false, None::<&str>)?;
    let open = MenuItem::with_id(app, "open", "Open Berth", true, None::<&str>)?;
    let start = MenuItem::with_id(app, "start", "Start engine", false, None::<&str>)?;
    let stop = MenuItem::with_id(app, "stop", "Stop engine", false, None::<&str>)?;
    let quit = MenuItem::with_id(app, "quit", "Quit Berth…", true, None::<&str>)?;
    let sep = PredefinedMenuItem::separator(app)?;
    let sep2 = PredefinedMenuItem::separator(app)?;
    let menu = Menu::with_items(app, &[&state, &sep, &open, &start, &stop, &sep2, &quit])?;
    let mut b = TrayIconBuilder::with_id(TRAY_ID)
        .tooltip("Berth")
        .menu(&menu)
        .show_menu_on_left_click(true)
        .on_menu_event(|app, ev| match ev.id().as_ref() {
            "open" => show_main(app),
            // The window runs the engine commands (with their progress and
            // errors), so the tray asks it to.
            "start" => {
                show_main(app);
                let _ = app.emit("tray-action", "start");
            }
            "stop" => {
                show_main(app);
                let _ = app.emit("tray-action", "stop");
            }
            "quit" => {
                show_main(app);
                let _ = app.emit("tray-action", "quit");
            }
            _ => {}
        });
    if let Some(icon) = app.default_window_icon() {
        b = b.icon(icon.clone());
    }
    b.build(app)?;
    Ok(TrayItems { state, start, stop })
}

/// Shows the tray's state and which of Start/Stop applies.
pub fn update<R: Runtime>(items: &TrayItems<R>, state: VmState) -> tauri::Result<()> {
    items.state.set_text(format!("Berth: {state}"))?;
    items.start.set_enabled(state == VmState::Stopped)?;
    items.stop.set_enabled(state == VmState::Running)?;
    Ok(())
}

/// Brings the main window up (from the tray, or a second launch).
pub fn show_main<R: Runtime>(app: &AppHandle<R>) {
    if let Some(w) = app.get_webview_window("main") {
        let _ = w.unminimize();
        let _ = w.show();
        let _ = w.set_focus();
    }
}
