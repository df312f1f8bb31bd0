// The app's commands, one by one (build.rs declares them to Tauri's
// capability system; `capabilities/default.json` allows them).
pub const ALL: &[&str] = &[
    "engine_status",
    "engine_start",
    "engine_stop",
    "engine_restart",
    "containers_watch",
    "container_action",
    "container_inspect",
    "logs_stream",
    "logs_stop",
    "logs_save",
    "terminal_open",
    "terminal_write",
    "terminal_resize",
    "terminal_close",
    "config_get",
    "config_set",
    "app_quit",
];
