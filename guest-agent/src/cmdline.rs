//! Settings the host passes on the kernel command line (`berth.*=`).

use std::path::PathBuf;

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
        }
    }
}

/// Parses a kernel command line. Unknown words are ignored (they belong to
/// the kernel); malformed `berth.*` values fall back to the default.
pub fn parse(cmdline: &str) -> Settings {
    let mut s = Settings::default();
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "berth.data" if value.starts_with("/dev/") => s.data_disk = PathBuf::from(value),
            "berth.hostname" if valid_hostname(value) => s.hostname = value.to_owned(),
            "berth.echo" => s.echo = value == "1",
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
            "berth.selftest berth.selftest=yes berth.data=vdb berth.hostname=-x berth.hostname=a_b",
        );
        assert_eq!(s, Settings::default());
    }
}
