//! `docker build` through the forwarded socket (the build context is an
//! upload; the output a long stream).

use std::time::Duration;

use super::{eventually, Case, Ctx, BB};

pub const CASES: &[Case] = &[("docker_build_multistage_cached", build_multistage)];

fn build_multistage(ctx: &Ctx) {
    let dir = ctx.work.join("build-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("greeting.txt"), "ahoy\n").unwrap();
    // A few MiB of context so the upload is not trivial.
    std::fs::write(dir.join("blob.bin"), vec![7u8; 4 << 20]).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {BB} AS builder\n\
             WORKDIR /src\n\
             COPY greeting.txt blob.bin ./\n\
             RUN echo \"built $(cat greeting.txt) $(md5sum blob.bin | cut -c1-8)\" > out.txt\n\
             FROM {BB}\n\
             ENV GREETING=berth\n\
             WORKDIR /app\n\
             COPY --from=builder /src/out.txt ./out.txt\n\
             RUN chown -R 1000:1000 /app\n\
             USER 1000:1000\n\
             HEALTHCHECK --interval=1s --timeout=3s --retries=3 CMD test -s /app/out.txt\n\
             CMD [\"sh\", \"-c\", \"echo $GREETING $(cat out.txt) uid=$(id -u) pwd=$(pwd); sleep 600\"]\n"
        ),
    )
    .unwrap();
    let tag = "berth-e2e/app:1";
    let build = |what: &str| {
        let out = ctx
            .docker_cmd(&["build", "-t", tag, dir.to_str().unwrap()])
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .unwrap();
        super::ok(out, what)
    };
    let first = build("first build");
    assert!(first.contains("Successfully tagged"), "{first}");
    let id1 = ctx.docker_ok(&["image", "inspect", "-f", "{{.Id}}", tag]);
    let second = build("rebuild");
    let hits = second.matches("Using cache").count();
    assert!(
        hits >= 6,
        "expected layer-cache hits on rebuild, got {hits}:\n{second}"
    );
    assert_eq!(
        ctx.docker_ok(&["image", "inspect", "-f", "{{.Id}}", tag]),
        id1
    );

    ctx.docker_ok(&["run", "-d", "--name", "e2e-app", tag]);
    let mut logs = String::new();
    eventually("app output", Duration::from_secs(30), || {
        logs = ctx.docker_ok(&["logs", "e2e-app"]);
        !logs.is_empty()
    });
    assert!(
        logs.starts_with("berth built ahoy ") && logs.contains("uid=1000 pwd=/app"),
        "{logs}"
    );
    eventually("healthy", Duration::from_secs(60), || {
        ctx.docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", "e2e-app"])
            .trim()
            == "healthy"
    });
    ctx.docker_ok(&["rm", "-f", "e2e-app"]);
}
