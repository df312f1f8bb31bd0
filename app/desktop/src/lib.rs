//! Berth's desktop app: a thin Tauri shell. The engine is driven through
//! `berth-core`, Docker through the forwarded socket (bollard); the UI in
//! `ui/` calls the commands in [`commands`].

pub mod commands;
pub mod state;
pub mod tray;

use std::time::Duration;

use berth_core::paths::StateDir;
use tauri::{Manager, RunEvent, WindowEvent};

use crate::state::AppState;

/// How often the tray re-reads the engine's state.
const TRAY_EVERY: Duration = Duration::from_secs(2);

/// The app with every command registered, on any runtime (the mock one in
/// tests).
pub fn builder<R: tauri::Runtime>(state: AppState) -> tauri::Builder<R> {
    tauri::Builder::<R>::new()
        .manage(state)
        .invoke_handler(tauri::generate_handler![
            commands::engine_status,
            commands::engine_start,
            commands::engine_stop,
            commands::engine_restart,
            commands::containers_watch,
            commands::container_action,
            commands::container_inspect,
            commands::logs_stream,
            commands::stream_stop,
            commands::logs_save,
            commands::terminal_open,
            commands::terminal_write,
            commands::terminal_resize,
            commands::terminal_close,
            commands::config_get,
            commands::config_set,
            commands::app_quit,
            commands::usage_watch,
            commands::stats_stream,
            commands::images_list,
            commands::image_remove,
            commands::images_prune,
            commands::image_history,
            commands::image_pull,
            commands::image_run,
            commands::volumes_list,
            commands::volume_create,
            commands::volume_remove,
            commands::volumes_prune,
            commands::volume_browse,
            commands::engine_usage,
            commands::console_log,
            commands::diagnostics_save,
            commands::reset_preview,
            commands::engine_reset,
        ])
}

/// Runs the app until it quits.
pub fn run() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let state_dir = match StateDir::for_vm("default") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("berth-desktop: {e}");
            std::process::exit(1);
        }
    };
    let app = builder::<tauri::Wry>(AppState::new(state_dir))
        // A second launch focuses the first window instead.
        .plugin(tauri_plugin_single_instance::init(|app, _argv, _cwd| {
            tray::show_main(app)
        }))
        .plugin(tauri_plugin_dialog::init())
        .plugin(tauri_plugin_opener::init())
        .plugin(tauri_plugin_autostart::init(
            tauri_plugin_autostart::MacosLauncher::LaunchAgent,
            None,
        ))
        .setup(|app| {
            let items = tray::create(app.handle())?;
            let handle = app.handle().clone();
            tauri::async_runtime::spawn(async move {
                let mut last = None;
                loop {
                    let st = handle.state::<AppState>();
                    let now = berth_core::lifecycle::status(&st.state_dir)
                        .await
                        .map(|s| s.state)
                        .unwrap_or(berth_core::status::VmState::Stopped);
                    if last != Some(now) {
                        let _ = tray::update(&items, now);
                        last = Some(now);
                    }
                    tokio::time::sleep(TRAY_EVERY).await;
                }
            });
            Ok(())
        })
        .on_window_event(|window, event| {
            // Closing the window leaves the app (and the engine) running in
            // the tray.
            if let WindowEvent::CloseRequested { api, .. } = event {
                api.prevent_close();
                let _ = window.hide();
            }
        })
        .build(tauri::generate_context!());
    let app = match app {
        Ok(a) => a,
        Err(e) => {
            eprintln!("berth-desktop: cannot start the window: {e}");
            std::process::exit(1);
        }
    };
    app.run(|_app, event| {
        if let RunEvent::ExitRequested { api, code, .. } = event {
            // Only an explicit quit (code set) ends the app.
            if code.is_none() {
                api.prevent_exit();
            }
        }
    });
}
