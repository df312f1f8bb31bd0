//! Host folders in containers (virtio-fs): shares at the same path, the
//! semantics a local disk has, a read-only share, a real database and a
//! build writing thousands of files. The suite shares the home directory,
//! the temp directory (where its scratch lives) and one read-only folder.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{eventually, Case, Ctx, BB};

pub const CASES: &[Case] = &[
    ("shares_mounted_at_the_same_paths", same_paths),
    ("shares_container_files_belong_to_the_host_user", ownership),
    ("shares_host_edits_reach_containers", host_edits),
    ("shares_chown_chmod_in_containers", chown_chmod),
    ("shares_behave_as_a_local_disk", local_disk),
    ("shares_read_only_refuse_writes", read_only),
    ("shares_sqlite_database_on_a_bind_mount", sqlite),
    ("shares_build_writes_thousands_of_files", many_files),
    ("shares_compose_relative_volume", compose_volume),
    ("shares_file_events_reach_container_watchers", file_events),
];

/// The folder the harness shares read-only (under the scratch directory).
pub fn ro_share(work: &Path) -> PathBuf {
    work.join("ro-share")
}

/// The `shares` setting the harness starts with.
pub fn setting(work: &Path) -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    let tmp = std::env::temp_dir().display().to_string();
    let ro = ro_share(work);
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("readme"), "read only\n").unwrap();
    format!(
        "{},{},{}:ro",
        home.trim_end_matches('/'),
        tmp.trim_end_matches('/'),
        ro.display()
    )
}

/// A fresh directory under the scratch directory (inside the temp share).
fn dir(ctx: &Ctx, name: &str) -> PathBuf {
    let d = ctx.work.join("shares").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `docker run --rm -v DIR:DIR BB sh -c SCRIPT`, stdout.
fn sh_in(ctx: &Ctx, d: &Path, extra: &[&str], script: &str) -> String {
    let bind = format!("{0}:{0}", s(d));
    let mut a = vec!["run", "--rm", "-v", &bind, "-w", s(d)];
    a.extend_from_slice(extra);
    a.extend([BB, "sh", "-c", script]);
    ctx.docker_ok(&a)
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn same_paths(ctx: &Ctx) {
    let st = ctx.status();
    let shares: Vec<(String, bool)> = st["shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_owned(),
                v["read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    let tmp = std::env::temp_dir().display().to_string();
    assert!(
        shares.contains(&(tmp.trim_end_matches('/').to_owned(), false)),
        "{shares:?}"
    );
    assert!(shares.contains(&(ro_share(&ctx.work).display().to_string(), true)));
    let text = ctx.berth_ok(&["status"]);
    assert!(text.contains("shared folders:"), "{text}");
    // In the guest: virtiofs at the very same paths, shared mounts.
    let mounts = ctx.berth_ok(&["shell", "--", "cat", "/proc/self/mountinfo"]);
    for (path, _) in &shares {
        let line = mounts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(path.as_str()) && l.contains("virtiofs"))
            .unwrap_or_else(|| panic!("{path} is not a virtiofs mount in the guest:\n{mounts}"));
        assert!(
            line.contains(" shared:"),
            "{path} is not a shared mount: {line}"
        );
    }
    // A bind mount of any path under a share works unchanged, however deep.
    let d = dir(ctx, "same/deeper/still");
    std::fs::write(d.join("hello"), "from the host\n").unwrap();
    let out = ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &format!("{}:/src", s(&d)),
        BB,
        "cat",
        "/src/hello",
    ]);
    assert_eq!(out, "from the host\n");
    // A host path in no share is refused before dockerd would make an
    // empty directory for it in the guest (the agent's Docker-port
    // forwarder checks each create), with the way to share it — on the guest's read-only root
    // and in its writable places alike, for `-v` and `--mount`.
    for (flag, arg) in [
        ("-v", "/opt/berth-e2e-not-shared:/x"),
        ("-v", "/var/berth-e2e-not-shared:/x"),
        (
            "--mount",
            "type=bind,source=/var/berth-e2e-not-shared,target=/x",
        ),
    ] {
        let out = ctx.docker(&["run", "--rm", flag, arg, BB, "true"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("is not in a folder shared with the Berth VM")
                && err.contains("berth config set shares")
                && err.contains("berth restart"),
            "{flag} {arg}: {err}"
        );
        println!(
            "    a path in no share ({flag}): {}",
            err.lines().next().unwrap_or("").trim()
        );
    }
    assert!(
        !ctx.berth_ok(&["shell", "--", "ls", "/var"])
            .contains("berth-e2e-not-shared"),
        "an empty directory was made in the guest"
    );
    // Paths that exist in the guest still bind as before.
    let out = ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        BB,
        "test",
        "-S",
        "/var/run/docker.sock",
    ]);
    assert_eq!(out, "");
    // Changing the shares while the VM runs says a restart is needed.
    let current = ctx.berth_ok(&["config", "get", "shares"]);
    let out = ctx.berth_ok(&["config", "set", "shares", current.trim()]);
    assert!(out.contains("after `berth restart`"), "{out}");
    // `:rshared` needs the source on a shared mount, as on a Linux host.
    ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &format!("{0}:{0}:rshared", s(&d)),
        BB,
        "true",
    ]);
}

fn ownership(ctx: &Ctx) {
    let d = dir(ctx, "owner");
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = sh_in(
        ctx,
        &d,
        &["--user", "1234:2345"],
        "echo made > by-1234 && stat -c %u:%g by-1234",
    );
    assert_eq!(out.trim(), "1234:2345", "the container sees its own owner");
    // On the host at once (the run has returned), owned by the host user.
    let f = d.join("by-1234");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "made\n");
    let m = std::fs::metadata(&f).unwrap();
    assert_eq!(m.uid(), euid(), "host owner");
    let view = xattr::get(&f, berth_devices::virtio::fs::OWNER_XATTR).unwrap();
    assert_eq!(view.as_deref(), Some(&b"1234:2345"[..]));
    println!(
        "    host: uid {} gid {}; guest view in xattr: 1234:2345",
        m.uid(),
        m.gid()
    );
}

fn host_edits(ctx: &Ctx) {
    let d = dir(ctx, "edits");
    let live = d.join("live");
    std::fs::write(&live, "v1\n").unwrap();
    let bind = format!("{}:/src", s(&d));
    let id = ctx.docker_ok(&[
        "run",
        "-d",
        "-v",
        &bind,
        BB,
        "sh",
        "-c",
        "while true; do echo \"$(cat /src/live) $(ls /src | tr '\\n' ,)\"; usleep 100000; done",
    ]);
    let id = id.trim();
    let last = |ctx: &Ctx| {
        let o = ctx.docker(&["logs", "--tail", "1", id]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    eventually("the watcher prints v1", Duration::from_secs(30), || {
        last(ctx).starts_with("v1")
    });
    let mut seen = Vec::new();
    for (what, change, expect) in [
        ("edit", 0, "v2 "),
        ("create", 1, "new-file"),
        ("delete", 2, "gone"),
    ] {
        let t = Instant::now();
        match change {
            0 => std::fs::write(&live, "v2\n").unwrap(),
            1 => std::fs::write(d.join("new-file"), "x").unwrap(),
            _ => std::fs::remove_file(d.join("new-file")).unwrap(),
        }
        eventually(
            &format!("the container sees the {what}"),
            Duration::from_secs(10),
            || {
                let l = last(ctx);
                if expect == "gone" {
                    l.starts_with("v2") && !l.contains("new-file")
                } else {
                    l.contains(expect)
                }
            },
        );
        seen.push(format!("{what} {:.2} s", t.elapsed().as_secs_f64()));
    }
    println!(
        "    host change seen in the container (upper bound, includes `docker logs`): {}",
        seen.join(", ")
    );
    ctx.docker_ok(&["rm", "-f", id]);
}

fn chown_chmod(ctx: &Ctx) {
    let d = dir(ctx, "chown");
    std::fs::create_dir(d.join("pgdata")).unwrap();
    std::fs::write(d.join("pgdata/conf"), "x").unwrap();
    let before = std::fs::metadata(d.join("pgdata")).unwrap();
    // What a database image's entrypoint does to its data directory.
    let out = sh_in(
        ctx,
        &d,
        &[],
        "chown -R 999:999 pgdata && chmod 700 pgdata && chmod 600 pgdata/conf && stat -c '%u:%g %a' pgdata pgdata/conf",
    );
    assert_eq!(out, "999:999 700\n999:999 600\n");
    // Another container sees the same, and can then act as that user.
    let out = sh_in(
        ctx,
        &d,
        &["--user", "999:999"],
        "stat -c '%u:%g %a' pgdata && echo ok > pgdata/written-by-999 && cat pgdata/written-by-999",
    );
    assert_eq!(out, "999:999 700\nok\n");
    let after = std::fs::metadata(d.join("pgdata")).unwrap();
    assert_eq!(
        (after.uid(), after.gid()),
        (before.uid(), before.gid()),
        "host ownership unchanged"
    );
    assert_eq!(after.mode() & 0o777, 0o700, "the mode reaches the host");
}

fn local_disk(ctx: &Ctx) {
    let d = dir(ctx, "semantics");
    let tool = berth_testkit::fstool(&d);
    let t = s(&tool);
    let out = sh_in(
        ctx,
        &d,
        &[],
        &format!(
            "set -e
echo target > a
ln -s a sym && readlink sym && cat sym
ln a hard && stat -c %h a && [ \"$(stat -c %i a)\" = \"$(stat -c %i hard)\" ] && echo same-inode
echo old > existing && echo new > tmp && mv tmp existing && cat existing
echo mmap-me > m && {t} mmap m
{t} append ap
{t} fsync fs
{t} locks lk
{t} big big
"
        ),
    );
    assert_eq!(
        out,
        "a\ntarget\n2\nsame-inode\nnew\nmmap:ok mmap-me\n\nappend:ok ababab\nfsync:ok\nlocks:ok flock and fcntl exclusive and released\nbig:ok size=5368709123\n"
    );
    // The host sees the same things.
    assert_eq!(std::fs::read_link(d.join("sym")).unwrap(), Path::new("a"));
    assert_eq!(std::fs::metadata(d.join("a")).unwrap().nlink(), 2);
    assert_eq!(
        std::fs::read_to_string(d.join("existing")).unwrap(),
        "new\n"
    );
    assert_eq!(std::fs::read_to_string(d.join("fs")).unwrap(), "durable\n");
    let big = std::fs::metadata(d.join("big")).unwrap();
    assert_eq!(big.len(), (5u64 << 30) + 3);
    assert!(big.blocks() < 1024, "the big file stays sparse on the host");
    std::fs::remove_file(d.join("big")).unwrap();
}

fn read_only(ctx: &Ctx) {
    let d = dir(ctx, "ro-bind");
    let tool = berth_testkit::fstool(&d);
    // A `:ro` bind mount of a read-write share.
    let out = ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &format!("{0}:{0}:ro", s(&d)),
        BB,
        s(&tool),
        "write",
        &format!("{}/x", s(&d)),
    ]);
    assert_eq!(out.trim(), "write:errno EROFS");
    // A read-only share, even through a read-write bind mount.
    let ro = ro_share(&ctx.work);
    let out = ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &format!("{0}:{0}", s(&ro)),
        "-v",
        &format!("{0}:{0}:ro", s(&d)),
        BB,
        "sh",
        "-c",
        &format!("cat {0}/readme; {1} write {0}/x", s(&ro), s(&tool)),
    ]);
    assert_eq!(out, "read only\nwrite:errno EROFS\n");
    assert!(!ro.join("x").exists());
}

/// An image holding the host's sqlite3 with its libraries.
fn sqlite_image(ctx: &Ctx) -> Option<&'static str> {
    const IMAGE: &str = "berth-e2e/sqlite:1";
    let bin = berth_core::paths::find_on_path("sqlite3")?;
    if ctx.docker(&["image", "inspect", IMAGE]).status.success() {
        return Some(IMAGE);
    }
    let d = ctx.work.join("sqlite-image");
    std::fs::create_dir_all(&d).unwrap();
    let ldd = std::process::Command::new("ldd")
        .arg(&bin)
        .output()
        .unwrap();
    let mut copies = vec![(bin.clone(), PathBuf::from("/usr/bin/sqlite3"))];
    for l in String::from_utf8_lossy(&ldd.stdout).lines() {
        let p = l
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(p) = p {
            copies.push((p.clone(), p));
        }
    }
    let mut df = format!("FROM {BB}\n");
    for (i, (from, to)) in copies.iter().enumerate() {
        let name = format!("f{i}");
        std::fs::copy(from, d.join(&name)).unwrap();
        df.push_str(&format!("COPY {name} {}\n", to.display()));
    }
    std::fs::write(d.join("Dockerfile"), df).unwrap();
    ctx.docker_ok(&["build", "-q", "-t", IMAGE, s(&d)]);
    Some(IMAGE)
}

fn sqlite(ctx: &Ctx) {
    if !super::have_program("sqlite3", "sqlite3") {
        return;
    }
    let Some(image) = sqlite_image(ctx) else {
        return;
    };
    let d = dir(ctx, "sqlite");
    let mut sql = String::from(
        "PRAGMA journal_mode=DELETE; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);\n",
    );
    for batch in 0..20 {
        sql.push_str("BEGIN;\n");
        for i in 0..100 {
            sql.push_str(&format!("INSERT INTO t(v) VALUES('row {batch}-{i}');\n"));
        }
        sql.push_str("COMMIT;\n");
    }
    sql.push_str("SELECT count(*) FROM t; PRAGMA integrity_check;\n");
    std::fs::write(d.join("load.sql"), &sql).unwrap();
    // As a database image does: the entrypoint (root) hands the data
    // directory to the database's user, which then runs the database.
    let bind = format!("{}:/data", s(&d));
    ctx.docker_ok(&["run", "--rm", "-v", &bind, BB, "chown", "999:999", "/data"]);
    let t = Instant::now();
    let out = ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &bind,
        "--user",
        "999:999",
        image,
        "sh",
        "-c",
        "sqlite3 /data/app.db < /data/load.sql",
    ]);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out, "delete\n2000\nok\n");
    // The host's sqlite3 reads the same database.
    let host = std::process::Command::new("sqlite3")
        .arg(d.join("app.db"))
        .arg("SELECT count(*), max(v) FROM t; PRAGMA integrity_check;")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&host.stdout), "2000|row 9-99\nok\n");
    println!("    2000 rows in 20 transactions by uid 999 in {secs:.1} s (docker run included); host sqlite3 agrees");
}

fn many_files(ctx: &Ctx) {
    let d = dir(ctx, "build");
    let src = d.join("src");
    for i in 0..40 {
        let sub = src.join(format!("pkg{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        for j in 0..75 {
            std::fs::write(sub.join(format!("m{j}.js")), format!("module {i}.{j}\n")).unwrap();
        }
    }
    let t = Instant::now();
    let out = sh_in(
        ctx,
        &d,
        &[],
        "tar -cf src.tar src && mkdir out && tar -xf src.tar -C out && find out -type f | wc -l",
    );
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.trim(), "3000");
    let n = walk_count(&d.join("out"));
    assert_eq!(n, 3000, "files on the host");
    assert_eq!(
        std::fs::read_to_string(d.join("out/src/pkg39/m74.js")).unwrap(),
        "module 39.74\n"
    );
    println!("    3000 files archived, extracted and listed in {secs:.1} s (docker run included); all on the host");
}

fn walk_count(p: &Path) -> usize {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk_count(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn compose_volume(ctx: &Ctx) {
    if !super::have_program("docker-compose", "docker-compose") {
        return;
    }
    let d = dir(ctx, "compose-app");
    std::fs::create_dir_all(d.join("app")).unwrap();
    std::fs::write(d.join("app/index.txt"), "compose sees the host\n").unwrap();
    std::fs::write(
        d.join("docker-compose.yml"),
        format!(
            "version: \"2.4\"\nservices:\n  app:\n    image: {BB}\n    volumes:\n      - ./app:/app\n    command: [\"sh\", \"-c\", \"cat /app/index.txt && echo written > /app/out.txt\"]\n"
        ),
    )
    .unwrap();
    let sock = ctx.state.join("docker.sock");
    let out = std::process::Command::new("docker-compose")
        .args(["-p", "berthe2eshares", "run", "--rm", "app"])
        .current_dir(&d)
        .env("DOCKER_HOST", format!("unix://{}", sock.display()))
        .env("DOCKER_CONFIG", &ctx.docker_config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = super::ok(out, "docker-compose run");
    assert!(text.contains("compose sees the host"), "{text}");
    assert_eq!(
        std::fs::read_to_string(d.join("app/out.txt")).unwrap(),
        "written\n"
    );
}

/// An inotify watcher in a container (`fstool watch`, printing as busybox's
/// inotifyd: `n` create, `c` modify, `w` close-write, `d` delete) on a bind
/// mount; the host creates, modifies, deletes and renames files in it.
fn file_events(ctx: &Ctx) {
    let d = dir(ctx, "events");
    std::fs::write(d.join("existing.js"), "v1\n").unwrap();
    let tools = dir(ctx, "events-tools");
    let tool = berth_testkit::fstool(&tools);
    let bind = format!("{}:/src", s(&d));
    let tool_bind = format!("{}:/tools", s(&tools));
    let id = ctx.docker_ok(&[
        "run",
        "-d",
        "-v",
        &bind,
        "-v",
        &tool_bind,
        BB,
        "/tools/fstool",
        "watch",
        "/src",
    ]);
    assert!(tool.exists());
    let id = id.trim();
    let logs = |ctx: &Ctx| {
        let o = ctx.docker(&["logs", id]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // inotifyd has started once a change made in the container shows.
    ctx.docker_ok(&["exec", id, "touch", "/src/ready"]);
    eventually("the watcher runs", Duration::from_secs(30), || {
        logs(ctx).contains("n\t/src\tready")
    });
    let mut seen = Vec::new();
    type Step<'a> = (&'a str, &'a str, Box<dyn Fn() + 'a>);
    let steps: [Step; 5] = [
        (
            "create",
            "n\t/src\tnew.js",
            Box::new(|| std::fs::write(d.join("new.js"), "x").unwrap()),
        ),
        (
            "modify",
            "c\t/src\texisting.js",
            Box::new(|| std::fs::write(d.join("existing.js"), "v2\n").unwrap()),
        ),
        (
            "delete",
            "d\t/src\tnew.js",
            Box::new(|| std::fs::remove_file(d.join("new.js")).unwrap()),
        ),
        (
            "mkdir",
            "n\t/src\tsubdir",
            Box::new(|| std::fs::create_dir(d.join("subdir")).unwrap()),
        ),
        (
            "rename",
            "n\t/src\trenamed.js",
            Box::new(|| std::fs::rename(d.join("existing.js"), d.join("renamed.js")).unwrap()),
        ),
    ];
    for (what, line, act) in &steps {
        let t = Instant::now();
        act();
        eventually(
            &format!("the container's watcher sees the host's {what}"),
            Duration::from_secs(10),
            || logs(ctx).contains(line),
        );
        seen.push(format!("{what} {:.2} s", t.elapsed().as_secs_f64()));
    }
    let all = logs(ctx);
    assert!(
        all.contains("d\t/src\texisting.js"),
        "rename reports the old name gone:\n{all}"
    );
    // The watcher that reacts reads the new content at once.
    let out = ctx.docker_ok(&["exec", id, "cat", "/src/renamed.js"]);
    assert_eq!(out, "v2\n");
    println!("    host change seen by inotifyd in the container (upper bound, includes `docker logs`): {}", seen.join(", "));
    ctx.docker_ok(&["rm", "-f", id]);
}
