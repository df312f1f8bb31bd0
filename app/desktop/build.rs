fn main() {
    // Each command is declared so capabilities can allow it by name.
    let attrs = tauri_build::Attributes::new()
        .app_manifest(tauri_build::AppManifest::new().commands(berth_desktop_commands::ALL));
    tauri_build::try_build(attrs).expect("tauri build script");
}

mod berth_desktop_commands {
    include!("src/command_names.rs");
}
