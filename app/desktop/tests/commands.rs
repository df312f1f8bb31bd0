//! The app's commands through Tauri's IPC on the mock runtime (no display,
//! no VM): arguments as the UI sends them, answers and error codes as the
//! UI reads them. The engine is stopped here, so these check what the app
//! says then; the running engine is the end-to-end suite's part.

use berth_core::paths::StateDir;
use berth_desktop::state::AppState;
use serde_json::{json, Value};
use tauri::ipc::{CallbackFn, InvokeBody};
use tauri::test::{get_ipc_response, MockRuntime};
use tauri::webview::InvokeRequest;
use tauri::WebviewWindow;

struct App {
    app: tauri::App<MockRuntime>,
    window: WebviewWindow<MockRuntime>,
    dir: std::path::PathBuf,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn app(name: &str) -> App {
    let dir = std::env::temp_dir().join(format!("berth-cmds-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = AppState::new(StateDir::at(&dir));
    let app = berth_desktop::builder::<MockRuntime>(state)
        // The app's own configuration and capabilities: a command the
        // window may not call fails here as in the app.
        .build(tauri::generate_context!(test = true))
        .expect("the app builds on the mock runtime");
    let window = tauri::WebviewWindowBuilder::new(&app, "main", Default::default())
        .build()
        .unwrap();
    App { app, window, dir }
}

/// Invokes `cmd` as the UI does; Ok with the answer or Err with the
/// UiError.
fn call(a: &App, cmd: &str, args: Value) -> Result<Value, Value> {
    call_from(a, "tauri://localhost", cmd, args)
}

fn call_from(a: &App, url: &str, cmd: &str, args: Value) -> Result<Value, Value> {
    get_ipc_response(
        &a.window,
        InvokeRequest {
            cmd: cmd.into(),
            callback: CallbackFn(0),
            error: CallbackFn(1),
            url: url.parse().unwrap(),
            body: InvokeBody::Json(args),
            headers: Default::default(),
            invoke_key: a.app.invoke_key().to_owned(),
        },
    )
    .map(|b| b.deserialize::<Value>().unwrap())
}

#[test]
fn status_of_a_stopped_engine() {
    let a = app("status");
    let s = call(&a, "engine_status", json!({})).unwrap();
    assert_eq!(s["state"], "stopped", "{s}");
    assert!(s["docker_socket"]
        .as_str()
        .unwrap()
        .ends_with("docker.sock"));
}

#[test]
fn settings_are_validated_with_the_cli_rules() {
    let a = app("config");
    let e = call(&a, "config_set", json!({"key": "cpus", "value": "0"})).unwrap_err();
    assert_eq!(e["code"], "config", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("out of range"),
        "{e}"
    );
    let e = call(&a, "config_set", json!({"key": "nonsense", "value": "1"})).unwrap_err();
    assert_eq!(e["code"], "config", "{e}");
    let ch = call(&a, "config_set", json!({"key": "cpus", "value": "1"})).unwrap();
    assert!(ch.is_object(), "{ch}");
    let c = call(&a, "config_get", json!({})).unwrap();
    assert_eq!(c["cpus"], 1, "{c}");
    // And the CLI's reader agrees.
    let on_disk = berth_core::config::Config::load(&StateDir::at(&a.dir).config()).unwrap();
    assert_eq!(on_disk.cpus, 1);
}

#[test]
fn docker_views_say_the_engine_is_stopped() {
    let a = app("stopped");
    for (cmd, args) in [
        ("images_list", json!({})),
        ("volumes_list", json!({})),
        ("images_prune", json!({})),
        (
            "image_remove",
            json!({"reference": "busybox:1", "force": false}),
        ),
        ("volume_create", json!({"name": "data"})),
        ("container_inspect", json!({"id": "abc"})),
    ] {
        let e = call(&a, cmd, args).unwrap_err();
        assert_eq!(e["code"], "engine_stopped", "{cmd}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains("start it"),
            "{cmd}: {e}"
        );
    }
    let e = call(&a, "engine_usage", json!({})).unwrap_err();
    assert_eq!(e["code"], "engine_stopped", "{e}");
}

#[test]
fn bad_arguments_are_refused_before_anything_runs() {
    let a = app("args");
    // A log stream of a name that could not be a container.
    let e = call(
        &a,
        "logs_stream",
        json!({"id": "../x", "tail": 10, "follow": false, "onLines": "__CHANNEL__:1", "onEnd": "__CHANNEL__:2"}),
    )
    .unwrap_err();
    assert_eq!(e["code"], "invalid", "{e}");
    // Missing or mistyped arguments are Tauri's own refusal, not a panic.
    let e = call(&a, "image_remove", json!({"reference": 5})).unwrap_err();
    assert!(e.to_string().contains("reference"), "{e}");
    // Stopping a stream that does not exist is harmless.
    assert!(call(&a, "stream_stop", json!({"stream": 12345})).is_ok());
}

#[test]
fn troubleshooting_works_with_the_engine_stopped() {
    let a = app("trouble");
    assert_eq!(call(&a, "console_log", json!({})).unwrap(), "");
    let p = call(&a, "reset_preview", json!({})).unwrap();
    assert!(
        p["data_disk"].as_str().unwrap().ends_with("data.img"),
        "{p}"
    );
    assert!(p["containers"].is_null(), "{p}");
    let out = a.dir.join("diag.tar.gz");
    let b = call(
        &a,
        "diagnostics_save",
        json!({"path": out.to_str().unwrap()}),
    )
    .unwrap();
    let files: Vec<String> = serde_json::from_value(b["files"].clone()).unwrap();
    assert!(files.contains(&"status.json".to_owned()), "{files:?}");
    assert!(files.contains(&"config.toml".to_owned()), "{files:?}");
    assert!(b["bytes"].as_f64().unwrap() > 100.0);
    // It is a real gzip'd tar with those files.
    let f = std::fs::File::open(&out).unwrap();
    let mut t = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let names: Vec<String> = t
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(
        names.contains(&"berth-diagnostics/status.json".to_owned()),
        "{names:?}"
    );
    // Reset with the engine stopped: settings back to defaults, data kept
    // unless asked.
    call(&a, "config_set", json!({"key": "cpus", "value": "1"})).unwrap();
    std::fs::write(a.dir.join("data.img"), b"data").unwrap();
    let done = call(
        &a,
        "engine_reset",
        json!({"wipeData": false, "progress": "__CHANNEL__:3"}),
    )
    .unwrap();
    assert!(done.to_string().contains("defaults"), "{done}");
    assert!(a.dir.join("data.img").exists());
    let c = call(&a, "config_get", json!({})).unwrap();
    assert_eq!(
        c,
        serde_json::to_value(berth_core::config::Config::default()).unwrap()
    );
    call(
        &a,
        "engine_reset",
        json!({"wipeData": true, "progress": "__CHANNEL__:4"}),
    )
    .unwrap();
    assert!(!a.dir.join("data.img").exists());
}

#[test]
fn only_the_apps_own_pages_may_call() {
    let a = app("acl");
    assert!(call(&a, "engine_status", json!({})).is_ok());
    let e = call_from(&a, "https://example.invalid/", "engine_status", json!({})).unwrap_err();
    assert!(e.to_string().contains("not allowed"), "{e}");
}
