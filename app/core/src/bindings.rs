//! The TypeScript types the desktop UI uses, generated from the Rust types
//! (ts-rs) into `ui/src/bindings/`, never written by hand. The test below
//! fails when they are out of date; `BERTH_WRITE_BINDINGS=1 cargo test -p
//! berth-core bindings` rewrites them.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use ts_rs::{Config, TS};

    use crate::docker::containers::{ContainerAction, ContainerDetail, ContainerRow};
    use crate::docker::logs::LogLine;

    fn export_all(dir: &Path) {
        let cfg = Config::new().with_large_int("number").with_out_dir(dir);
        crate::status::Status::export_all(&cfg).unwrap();
        crate::config::Config::export_all(&cfg).unwrap();
        ContainerRow::export_all(&cfg).unwrap();
        ContainerAction::export_all(&cfg).unwrap();
        ContainerDetail::export_all(&cfg).unwrap();
        LogLine::export_all(&cfg).unwrap();
        {
            use crate::docker::{images, stats, volumes};
            images::ImageRow::export_all(&cfg).unwrap();
            images::Removed::export_all(&cfg).unwrap();
            images::HistoryRow::export_all(&cfg).unwrap();
            images::PullProgress::export_all(&cfg).unwrap();
            images::RunSpec::export_all(&cfg).unwrap();
            volumes::VolumeRow::export_all(&cfg).unwrap();
            volumes::VolumeListing::export_all(&cfg).unwrap();
            stats::Usage::export_all(&cfg).unwrap();
            stats::StatsPoint::export_all(&cfg).unwrap();
            crate::troubleshoot::EngineUsage::export_all(&cfg).unwrap();
            crate::troubleshoot::Bundle::export_all(&cfg).unwrap();
            crate::troubleshoot::ResetPreview::export_all(&cfg).unwrap();
        }
        crate::lifecycle::ConfigChange::export_all(&cfg).unwrap();
        crate::uierror::UiError::export_all(&cfg).unwrap();
    }

    fn files(dir: &Path) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "ts"))
                    .map(|e| {
                        (
                            e.file_name().to_string_lossy().into_owned(),
                            std::fs::read_to_string(e.path()).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn typescript_bindings_are_current() {
        let committed: PathBuf =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ui/src/bindings");
        if std::env::var_os("BERTH_WRITE_BINDINGS").is_some() {
            let _ = std::fs::remove_dir_all(&committed);
            export_all(&committed);
        }
        let fresh = std::env::temp_dir().join(format!("berth-bindings-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&fresh);
        export_all(&fresh);
        let (want, have) = (files(&fresh), files(&committed));
        let _ = std::fs::remove_dir_all(&fresh);
        assert!(!want.is_empty());
        assert!(
            want == have,
            "ui/src/bindings is out of date with the Rust types: run \
             BERTH_WRITE_BINDINGS=1 cargo test -p berth-core bindings (want {:?}, have {:?})",
            want.iter().map(|f| &f.0).collect::<Vec<_>>(),
            have.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
    }
}
