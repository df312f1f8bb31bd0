//! Settings the host passes on the kernel command line (`berth.*=`).

use std::path::PathBuf;

use berth_proto::share::ShareSpec;
use berth_proto::NetConfig;

/// What the agent reads from `/proc/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Block device holding Docker's state (`berth.data=`, default `/dev/vdb`).
    pub data_disk: PathBuf,
    /// Guest hostname (`berth.hostname=`, default `berth`).
    pub hostname: String,
    /// Self-test mode (`berth.selftest=`), off unless asked for.
    pub selftest: Option<SelfTest>,
    /// Serve the byte echo port (`berth.echo=1`), for transport tests.
    pub echo: bool,
    /// The host created the data disk and it was never formatted
    /// (`berth.data_fresh=1`): a blank disk may be formatted. Without it a
    /// blank disk is a damaged one and is refused.
    pub data_fresh: bool,
    /// Test mode (`berth.test.panic=main|task`): once Docker is ready the
    /// agent panics on that path, to prove the safety net. Off unless asked.
    pub test_panic: Option<PanicPath>,
    /// The guest's network (`berth.ip=`, `berth.gw=`, `berth.mtu=`,
    /// `berth.ip6=`, `berth.gw6=`); without it only `lo` comes up.
    pub net: Option<NetConfig>,
    /// Host folders to mount (`berth.share=TAG,rw|ro,PATH`).
    pub shares: Vec<ShareSpec>,
}

/// Where a test-mode panic happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanicPath {
    /// On the agent's main path.
    Main,
    /// Inside a spawned task.
    Task,
}

/// `berth.selftest=<device>|none`: once Docker is ready, make sure the test
/// image exists (importing it from the raw tar on `<device>` if not), run a
/// container from it, print the result and power off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfTest {
    pub image_tar: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_disk: PathBuf::from("/dev/vdb"),
            hostname: "berth".to_owned(),
            selftest: None,
            echo: false,
            data_fresh: false,
            test_panic: None,
            net: None,
            shares: Vec::new(),
        }
    }
}

/// Parses a kernel command line. Unknown words are ignored (they belong to
/// the kernel); malformed `berth.*` values fall back to the default.
pub fn parse(cmdline: &str) -> Settings {
    let mut s = Settings {
        net: NetConfig::from_cmdline(cmdline),
        shares: ShareSpec::from_cmdline(cmdline),
        ..Settings::default()
    };
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "berth.data" if value.starts_with("/dev/") => s.data_disk = PathBuf::from(value),
            "berth.hostname" if valid_hostname(value) => s.hostname = value.to_owned(),
            "berth.echo" => s.echo = value == "1",
            "berth.data_fresh" => s.data_fresh = value == "1",
            "berth.test.panic" if value == "main" => s.test_panic = Some(PanicPath::Main),
            "berth.test.panic" if value == "task" => s.test_panic = Some(PanicPath::Task),
            "berth.selftest" if value == "none" => s.selftest = Some(SelfTest { image_tar: None }),
            "berth.selftest" if value.starts_with("/dev/") => {
                s.selftest = Some(SelfTest {
                    image_tar: Some(PathBuf::from(value)),
                })
            }
            _ => {}
        }
    }
    s
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_berth_words() {
        assert_eq!(
            parse("console=ttyS0 root=/dev/vda ro init=/sbin/berth-agent"),
            Settings::default()
        );
    }

    #[test]
    fn reads_berth_words() {
        let s = parse("quiet berth.data=/dev/vdc berth.hostname=dev-1 berth.selftest=/dev/vdd");
        assert_eq!(s.data_disk, PathBuf::from("/dev/vdc"));
        assert_eq!(s.hostname, "dev-1");
        assert_eq!(
            s.selftest,
            Some(SelfTest {
                image_tar: Some("/dev/vdd".into())
            })
        );
        assert_eq!(
            parse("berth.selftest=none").selftest,
            Some(SelfTest { image_tar: None })
        );
    }

    #[test]
    fn selftest_is_inert_unless_asked_and_bad_values_are_ignored() {
        let s = parse(
            "berth.selftest berth.selftest=yes berth.data=vdb berth.hostname=-x berth.hostname=a_b \
             berth.test.panic berth.test.panic=yes berth.data_fresh=yes",
        );
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn test_modes_and_the_fresh_disk_word() {
        let s = parse("berth.data_fresh=1 berth.test.panic=task");
        assert!(s.data_fresh);
        assert_eq!(s.test_panic, Some(PanicPath::Task));
        assert_eq!(
            parse("berth.test.panic=main").test_panic,
            Some(PanicPath::Main)
        );
    }
}
