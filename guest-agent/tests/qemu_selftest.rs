//! End to end, under QEMU (TCG here; `BERTH_QEMU_ACCEL=kvm` where a real KVM
//! exists): the real guest image boots, the agent formats a fresh data disk,
//! dockerd becomes ready, a container really runs, the image persists to a
//! second boot, ctrl-alt-del shuts down in order, and a data disk holding
//! something else is refused and left untouched.
//!
//! One test function so the boots run one after another (2 cores).

use std::time::Duration;

use berth_testkit::{uptime_of, Boot, Guest, Scratch};

const BOOT: Duration = Duration::from_secs(300);
const SHUTDOWN_MILESTONES: &[&str] = &[
    "berth-agent: shutdown-start",
    "berth-agent: dockerd-stopped",
    "berth-agent: containerd-stopped",
    "berth-agent: data-disk-unmounted",
    "berth-agent: power-off",
];

fn assert_in_order(console: &[String], needles: &[&str]) {
    let mut at = 0;
    for n in needles {
        match console[at..].iter().position(|l| l.contains(n)) {
            Some(i) => at += i + 1,
            None => panic!(
                "{n:?} missing (or out of order) on the console:\n{}",
                console.join("\n")
            ),
        }
    }
}

#[test]
fn guest_image_under_qemu() {
    let Some(dir) = berth_testkit::require_image() else {
        return;
    };
    let scratch = Scratch::new("qemu-selftest");
    let work = &scratch.0;
    let data = work.join("data.img");
    berth_testkit::sparse_disk(&data, 8 << 30);
    let tar = berth_testkit::busybox_rootfs_tar(work);

    // Boot 1: blank disk → formatted; image imported from the tar disk; a
    // container runs; orderly power-off ends QEMU by itself.
    let mut g = Guest::boot(Boot {
        dir: &dir,
        work,
        data_disk: Some(&data),
        extra_disk: Some(&tar),
        // The host says the disk is new: only then may a blank one be formatted.
        extra_cmdline: "berth.selftest=/dev/vdc berth.data_fresh=1",
        name: "boot1",
        vhost_user_vsock: None,
    });
    let (start, _) = g.wait_for("berth-agent: agent-start", BOOT);
    let (ready, wall) = g.wait_for("berth-agent: docker-ready", BOOT);
    eprintln!(
        "boot 1: agent-start at {} ms, docker-ready at {} ms guest uptime, {:.1} s host wall from QEMU start",
        uptime_of(&start),
        uptime_of(&ready),
        wall.as_secs_f64()
    );
    assert_eq!(
        g.wait_exit(BOOT),
        0,
        "QEMU should exit 0 after the guest's reset"
    );
    let console = g.console();
    assert_in_order(
        &console,
        &[
            "berth-agent: agent-start",
            "berth-agent: data-disk uptime_ms",
            "berth-agent: docker-ready",
            "berth-agent: selftest-image uptime_ms",
            "berth-agent: selftest-imported",
            "berth-agent: selftest-output berth-selftest-ok",
            "berth-agent: selftest-done",
        ],
    );
    // Both daemons start (in either order) after the disk and before ready.
    for daemon in [
        "berth-agent: containerd-started",
        "berth-agent: dockerd-started",
    ] {
        assert_in_order(
            &console,
            &[
                "berth-agent: data-disk uptime_ms",
                daemon,
                "berth-agent: docker-ready",
            ],
        );
    }
    assert!(console
        .iter()
        .any(|l| l.contains("data-disk") && l.contains("state=formatted")));
    assert!(console
        .iter()
        .any(|l| l.contains("selftest-image") && l.contains("present=false")));
    assert!(console
        .iter()
        .any(|l| l.contains("selftest-done") && l.contains("exit_code=0")));
    assert_in_order(&console, SHUTDOWN_MILESTONES);
    assert!(!console.iter().any(|l| l.contains("selftest-failed")));
    assert!(!console.iter().any(|l| l.contains("Kernel panic")));
    // The disk stayed sparse: far less allocated than its 8 GiB size.
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&data).unwrap()) * 512;
    eprintln!(
        "data disk after boot 1: {} MiB allocated of 8192",
        allocated >> 20
    );
    assert!(allocated < 1 << 30);

    // Boot 2: same data disk, no tar: the image is still there.
    let mut g = Guest::boot(Boot {
        dir: &dir,
        work,
        data_disk: Some(&data),
        extra_disk: None,
        extra_cmdline: "berth.selftest=none",
        name: "boot2",
        vhost_user_vsock: None,
    });
    assert_eq!(g.wait_exit(BOOT), 0);
    let console = g.console();
    assert!(console
        .iter()
        .any(|l| l.contains("data-disk") && l.contains("state=mounted")));
    assert!(console
        .iter()
        .any(|l| l.contains("selftest-image") && l.contains("present=true")));
    assert_in_order(
        &console,
        &[
            "berth-agent: selftest-output berth-selftest-ok",
            "berth-agent: selftest-done",
        ],
    );
    assert_in_order(&console, SHUTDOWN_MILESTONES);

    // Boot 3: no self-test; ctrl-alt-del from the host is an orderly shutdown.
    let mut g = Guest::boot(Boot {
        dir: &dir,
        work,
        data_disk: Some(&data),
        extra_disk: None,
        extra_cmdline: "",
        name: "boot3",
        vhost_user_vsock: None,
    });
    g.wait_for("berth-agent: docker-ready", BOOT);
    assert!(
        !g.console().iter().any(|l| l.contains("selftest")),
        "self-test must be inert unless asked"
    );
    g.monitor("sendkey ctrl-alt-delete");
    assert_eq!(g.wait_exit(BOOT), 0);
    let console = g.console();
    assert!(console.iter().any(|l| l.contains("SIGINT (ctrl-alt-del)")));
    assert_in_order(&console, SHUTDOWN_MILESTONES);

    // Boot 4: a data disk holding something that is not ext4 is refused and
    // not modified; dockerd never starts.
    let foreign = work.join("foreign.img");
    let mut bytes = vec![0u8; 1 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&foreign, &bytes).unwrap();
    let mut g = Guest::boot(Boot {
        dir: &dir,
        work,
        data_disk: Some(&foreign),
        extra_disk: None,
        extra_cmdline: "berth.selftest=none",
        name: "boot4",
        vhost_user_vsock: None,
    });
    assert_eq!(g.wait_exit(BOOT), 0);
    let console = g.console();
    assert!(console
        .iter()
        .any(|l| l.contains("data-disk") && l.contains("state=refused")));
    assert!(console.iter().any(|l| l.contains("refusing to format it")));
    assert!(!console.iter().any(|l| l.contains("dockerd-started")));
    assert_eq!(
        std::fs::read(&foreign).unwrap(),
        bytes,
        "a refused disk must be left untouched"
    );

    // Boot 5: the used data disk loses its first 64 KiB (the primary
    // superblock): it now reads as blank, but the host does not say it is
    // new, so it is refused, not reformatted, and not modified.
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.write_all(&[0u8; 64 << 10]).unwrap();
    }
    let before = berth_testkit::data_digest(&data);
    let mut g = Guest::boot(Boot {
        dir: &dir,
        work,
        data_disk: Some(&data),
        extra_disk: None,
        extra_cmdline: "berth.selftest=none",
        name: "boot5",
        vhost_user_vsock: None,
    });
    assert_eq!(g.wait_exit(BOOT), 0);
    let console = g.console();
    assert!(
        console
            .iter()
            .any(|l| l.contains("data-disk") && l.contains("state=refused")),
        "{}",
        g.tail(30)
    );
    assert!(console.iter().any(|l| l.contains("e2fsck -b 32768")));
    assert!(!console.iter().any(|l| l.contains("dockerd-started")));
    assert_eq!(
        berth_testkit::data_digest(&data),
        before,
        "the damaged disk must be left untouched"
    );
    // The recovery the message gives works: the backup superblock brings
    // the filesystem back.
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-y", "-b", "32768", "-B", "4096"])
        .arg(&data)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.code().is_some_and(|c| c <= 1),
        "e2fsck -b: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    // Boots 6 and 7: a panic in PID 1, in a spawned task and on the main
    // path (test mode, inert otherwise), ends the VM at once through the
    // safety net: no kernel panic, the disks synced, and the next boot
    // mounts the data disk.
    let boot_on_data = |name: &str, extra_cmdline: &str| {
        Guest::boot(Boot {
            dir: &dir,
            work,
            data_disk: Some(&data),
            extra_disk: None,
            extra_cmdline,
            name,
            vhost_user_vsock: None,
        })
    };
    for (name, path) in [("boot6", "task"), ("boot7", "main")] {
        let mut g = boot_on_data(name, &format!("berth.test.panic={path}"));
        g.wait_for("berth-agent: test-panic", BOOT);
        assert_eq!(
            g.wait_exit(BOOT),
            0,
            "the VM ends after a panic in PID 1 ({path})"
        );
        let console = g.console();
        assert_in_order(
            &console,
            &["berth-agent: fatal panic", "berth-agent: emergency-stop"],
        );
        assert!(
            !console.iter().any(|l| l.contains("Kernel panic")),
            "{}",
            g.tail(30)
        );
    }
    let mut g = boot_on_data("boot8", "berth.selftest=none");
    assert_eq!(g.wait_exit(BOOT), 0);
    let console = g.console();
    assert!(
        console
            .iter()
            .any(|l| l.contains("data-disk") && l.contains("state=mounted")),
        "{}",
        g.tail(30)
    );
    assert!(console
        .iter()
        .any(|l| l.contains("selftest-image") && l.contains("present=true")));
}
