//! The commands the UI calls: thin, each over one `berth-core` call. Long
//! work streams its progress over a channel; nothing here blocks the UI.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use berth_core::config::Config;
use berth_core::docker::containers::{self, ContainerAction, ContainerDetail, ContainerRow};
use berth_core::docker::images::{self, HistoryRow, ImageRow, PullProgress, Removed, RunSpec};
use berth_core::docker::stats::{self, StatsPoint, Usage};
use berth_core::docker::volumes::{self, VolumeListing, VolumeRow};
use berth_core::docker::{logs, terminal};
use berth_core::lifecycle::{self, ConfigChange};
use berth_core::status::Status;
use berth_core::troubleshoot::{self, Bundle, EngineUsage, ResetPreview};
use berth_core::uierror::UiError;
use tauri::ipc::Channel;
use tauri::State;

use crate::state::{AppState, MAX_STREAMS};

type Res<T> = Result<T, UiError>;

#[tauri::command]
pub async fn engine_status(state: State<'_, AppState>) -> Res<Status> {
    let mut s = lifecycle::status(&state.state_dir).await?;
    s.docker_context = berth_core::context::current();
    Ok(s)
}

#[tauri::command]
pub async fn engine_start(state: State<'_, AppState>, progress: Channel<String>) -> Res<Status> {
    let started = lifecycle::start(&state.state_dir, None, |line| {
        let _ = progress.send(line.to_owned());
    })
    .await;
    match started {
        Ok(lifecycle::Started::Now(s) | lifecycle::Started::AlreadyRunning(s)) => {
            let socket = std::path::PathBuf::from(&s.docker_socket);
            let cfg = Config::load(&state.state_dir.config()).unwrap_or_default();
            let _ = berth_core::context::install(&socket, cfg.switch_docker_context);
            Ok(s)
        }
        Err(e) => Err(e.into()),
    }
}

#[tauri::command]
pub async fn engine_stop(state: State<'_, AppState>, progress: Channel<String>) -> Res<String> {
    let stopped = lifecycle::stop(&state.state_dir, true, Duration::from_secs(30), |line| {
        let _ = progress.send(line.to_owned());
    })
    .await?;
    Ok(match stopped {
        lifecycle::Stopped::NotRunning => "Berth was not running".to_owned(),
        lifecycle::Stopped::Now(Some(r)) => r.message,
        lifecycle::Stopped::Now(None) => "Berth stopped".to_owned(),
    })
}

#[tauri::command]
pub async fn engine_restart(state: State<'_, AppState>, progress: Channel<String>) -> Res<Status> {
    lifecycle::stop(&state.state_dir, true, Duration::from_secs(30), |line| {
        let _ = progress.send(line.to_owned());
    })
    .await?;
    engine_start(state, progress).await
}

/// Sends the container list now and after every burst of container events
/// until the engine stops (then fails with `engine_stopped`) or a newer
/// watch replaces this one.
#[tauri::command]
pub async fn containers_watch(
    state: State<'_, AppState>,
    on_list: Channel<Vec<ContainerRow>>,
) -> Res<()> {
    let gen = state.watch_gen.fetch_add(1, Ordering::SeqCst) + 1;
    let gen_now = &state.watch_gen;
    state
        .with_docker(|d| async move {
            berth_core::docker::events::watch_containers(&d, |rows| {
                gen_now.load(Ordering::SeqCst) == gen && on_list.send(rows).is_ok()
            })
            .await
        })
        .await
}

#[tauri::command]
pub async fn container_action(
    state: State<'_, AppState>,
    id: String,
    action: ContainerAction,
) -> Res<()> {
    state
        .with_docker(|d| async move { containers::act(&d, &id, action).await })
        .await
}

#[tauri::command]
pub async fn container_inspect(state: State<'_, AppState>, id: String) -> Res<ContainerDetail> {
    state
        .with_docker(|d| async move { containers::inspect(&d, &id).await })
        .await
}

/// Streams a container's log in batches until it ends or `logs_stop`;
/// returns the stream's id at once.
#[tauri::command]
pub async fn logs_stream(
    state: State<'_, AppState>,
    id: String,
    tail: Option<u32>,
    follow: bool,
    on_lines: Channel<Vec<logs::LogLine>>,
    on_end: Channel<Option<UiError>>,
) -> Res<u64> {
    containers::check_id(&id).map_err(UiError::from)?;
    let docker = state.docker().await?;
    let (sid, stop) = state.open_stream("log and stats views")?;
    tokio::spawn(async move {
        let r = logs::stream(&docker, &id, tail, follow, |batch| {
            !stop.load(Ordering::Relaxed) && on_lines.send(batch).is_ok()
        })
        .await;
        let _ = on_end.send(r.err().map(UiError::from));
    });
    Ok(sid)
}

/// Stops a log or stats stream.
#[tauri::command]
pub fn stream_stop(state: State<'_, AppState>, stream: u64) {
    state.close_stream(stream);
}

/// Writes log text the UI assembled to a file the user picked.
#[tauri::command]
pub async fn logs_save(path: String, text: String) -> Res<()> {
    tokio::fs::write(&path, text)
        .await
        .map_err(|e| UiError::new("io", format!("cannot save {path}: {e}")))
}

/// Opens a shell in a running container; output arrives on `on_output`.
#[tauri::command]
pub async fn terminal_open(
    state: State<'_, AppState>,
    id: String,
    cols: u16,
    rows: u16,
    on_output: Channel<Vec<u8>>,
    on_exit: Channel<Option<String>>,
) -> Res<u64> {
    if state.terminals.lock().await.len() >= MAX_STREAMS {
        return Err(UiError::new(
            "too_many",
            format!("{MAX_STREAMS} terminals are open already; close one"),
        ));
    }
    let docker = state.docker().await?;
    let t = terminal::open(
        &docker,
        &id,
        cols,
        rows,
        move |bytes| {
            let _ = on_output.send(bytes);
        },
        move |why| {
            let _ = on_exit.send(why);
        },
    )
    .await?;
    let tid = state.next_id();
    state.terminals.lock().await.insert(tid, Arc::new(t));
    Ok(tid)
}

/// An open terminal by id.
async fn open_terminal(state: &AppState, id: u64) -> Res<Arc<terminal::Terminal>> {
    state
        .terminals
        .lock()
        .await
        .get(&id)
        .cloned()
        .ok_or_else(|| UiError::new("not_found", "that terminal is closed"))
}

#[tauri::command]
pub async fn terminal_write(state: State<'_, AppState>, terminal: u64, data: String) -> Res<()> {
    let t = open_terminal(&state, terminal).await?;
    t.write(data.as_bytes()).await.map_err(UiError::from)
}

#[tauri::command]
pub async fn terminal_resize(
    state: State<'_, AppState>,
    terminal: u64,
    cols: u16,
    rows: u16,
) -> Res<()> {
    let docker = state.docker().await?;
    let t = open_terminal(&state, terminal).await?;
    terminal::resize(&docker, &t, cols, rows)
        .await
        .map_err(UiError::from)
}

#[tauri::command]
pub async fn terminal_close(state: State<'_, AppState>, terminal: u64) -> Res<()> {
    let t = state.terminals.lock().await.remove(&terminal);
    if let Some(t) = t {
        // End the shell as a user would; the exec ends with it.
        let _ = t.write(b"\x04exit\n").await;
    }
    Ok(())
}

#[tauri::command]
pub fn config_get(state: State<'_, AppState>) -> Res<Config> {
    Ok(Config::load(&state.state_dir.config())?)
}

#[tauri::command]
pub async fn config_set(
    state: State<'_, AppState>,
    key: String,
    value: String,
) -> Res<ConfigChange> {
    Ok(lifecycle::set_config(&state.state_dir, &key, &value).await?)
}

/// Quits the app, stopping the engine first if asked.
#[tauri::command]
pub async fn app_quit<R: tauri::Runtime>(
    app: tauri::AppHandle<R>,
    state: State<'_, AppState>,
    stop_engine: bool,
) -> Res<()> {
    if stop_engine {
        lifecycle::stop(&state.state_dir, true, Duration::from_secs(30), |_| {}).await?;
    }
    app.exit(0);
    Ok(())
}

/// Sends the running containers' CPU and memory after each sweep until a
/// newer watch replaces this one or the engine stops.
#[tauri::command]
pub async fn usage_watch(state: State<'_, AppState>, on_usage: Channel<Vec<Usage>>) -> Res<()> {
    let gen = state.usage_gen.fetch_add(1, Ordering::SeqCst) + 1;
    let gen_now = &state.usage_gen;
    state
        .with_docker(|d| async move {
            stats::watch_usage(&d, |u| {
                gen_now.load(Ordering::SeqCst) == gen && on_usage.send(u).is_ok()
            })
            .await
        })
        .await
}

/// Streams one container's samples for its chart until `stream_stop`.
#[tauri::command]
pub async fn stats_stream(
    state: State<'_, AppState>,
    id: String,
    on_point: Channel<StatsPoint>,
) -> Res<u64> {
    containers::check_id(&id).map_err(UiError::from)?;
    let docker = state.docker().await?;
    let (sid, stop) = state.open_stream("log and stats views")?;
    tokio::spawn(async move {
        let _ = stats::stream(&docker, &id, |p| {
            !stop.load(Ordering::Relaxed) && on_point.send(p).is_ok()
        })
        .await;
    });
    Ok(sid)
}

#[tauri::command]
pub async fn images_list(state: State<'_, AppState>) -> Res<Vec<ImageRow>> {
    state
        .with_docker(|d| async move { images::list(&d).await })
        .await
}

#[tauri::command]
pub async fn image_remove(
    state: State<'_, AppState>,
    reference: String,
    force: bool,
) -> Res<Removed> {
    state
        .with_docker(|d| async move { images::remove(&d, &reference, force).await })
        .await
}

#[tauri::command]
pub async fn images_prune(state: State<'_, AppState>) -> Res<Removed> {
    state
        .with_docker(|d| async move { images::prune(&d).await })
        .await
}

#[tauri::command]
pub async fn image_history(state: State<'_, AppState>, reference: String) -> Res<Vec<HistoryRow>> {
    state
        .with_docker(|d| async move { images::history(&d, &reference).await })
        .await
}

/// Pulls an image, its per-layer progress on `on_progress`; returns when
/// the pull ended.
#[tauri::command]
pub async fn image_pull(
    state: State<'_, AppState>,
    reference: String,
    on_progress: Channel<PullProgress>,
) -> Res<PullProgress> {
    state
        .with_docker(|d| async move {
            images::pull(&d, &reference, |p| {
                let _ = on_progress.send(p);
                true
            })
            .await
        })
        .await
}

#[tauri::command]
pub async fn image_run(state: State<'_, AppState>, spec: RunSpec) -> Res<String> {
    state
        .with_docker(|d| async move { images::run(&d, &spec).await })
        .await
}

#[tauri::command]
pub async fn volumes_list(state: State<'_, AppState>) -> Res<Vec<VolumeRow>> {
    let sock = state.state_dir.docker_sock();
    state
        .with_docker(|d| async move { volumes::list(&d, &sock).await })
        .await
}

#[tauri::command]
pub async fn volume_create(state: State<'_, AppState>, name: String) -> Res<VolumeRow> {
    state
        .with_docker(|d| async move { volumes::create(&d, &name).await })
        .await
}

#[tauri::command]
pub async fn volume_remove(state: State<'_, AppState>, name: String) -> Res<()> {
    state
        .with_docker(|d| async move { volumes::remove(&d, &name).await })
        .await
}

#[tauri::command]
pub async fn volumes_prune(state: State<'_, AppState>) -> Res<Removed> {
    state
        .with_docker(|d| async move { volumes::prune(&d).await })
        .await
}

#[tauri::command]
pub async fn volume_browse(
    state: State<'_, AppState>,
    name: String,
    path: String,
) -> Res<VolumeListing> {
    let vsock = state.state_dir.vsock_sock();
    state
        .with_docker(|d| async move { volumes::browse(&d, &vsock, &name, &path).await })
        .await
}

#[tauri::command]
pub async fn engine_usage(state: State<'_, AppState>) -> Res<EngineUsage> {
    Ok(troubleshoot::engine_usage(&state.state_dir).await?)
}

#[tauri::command]
pub fn console_log(state: State<'_, AppState>) -> Res<String> {
    Ok(troubleshoot::console_log(&state.state_dir)?)
}

#[tauri::command]
pub async fn diagnostics_save(state: State<'_, AppState>, path: String) -> Res<Bundle> {
    Ok(troubleshoot::write_bundle(&state.state_dir, std::path::Path::new(&path)).await?)
}

#[tauri::command]
pub async fn reset_preview(state: State<'_, AppState>) -> Res<ResetPreview> {
    Ok(troubleshoot::reset_preview(&state.state_dir).await)
}

/// Stops the engine and puts the settings back; deletes the data disk
/// only when `wipe_data` (the UI asks first, naming what is lost).
#[tauri::command]
pub async fn engine_reset(
    state: State<'_, AppState>,
    wipe_data: bool,
    progress: Channel<String>,
) -> Res<Vec<String>> {
    Ok(troubleshoot::reset(&state.state_dir, wipe_data, |line| {
        let _ = progress.send(line.to_owned());
    })
    .await?)
}
