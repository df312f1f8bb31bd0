//! A VM's settings (`config.toml` in its state directory).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::driver::DriverChoice;

/// Errors reading, validating or changing settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("unknown setting {0:?}; settings are: {KEYS}")]
    UnknownKey(String),
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Names `berth config get|set` accepts.
pub const KEYS: &str =
    "cpus, memory_mib, disk_gib, cmdline_extra, driver, switch_docker_context, log_max_mib, dns_servers, shares";

/// Settings of one VM. Every field has a default, so a missing or partial
/// file is fine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Virtual CPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Size of the data disk (Docker's images, containers, volumes). It is
    /// sparse: only what is used takes space. It can grow, never shrink.
    pub disk_gib: u64,
    /// Words appended to the guest kernel command line.
    pub cmdline_extra: String,
    /// Which machine driver runs the VM.
    pub driver: DriverChoice,
    /// Make the `berth` docker context the current one on start.
    pub switch_docker_context: bool,
    /// `console.log` and `host-agent.log` are each rotated to `<name>.1`
    /// when they reach this size, so at most twice this is kept of each.
    pub log_max_mib: u64,
    /// Nameservers that answer the guest's DNS queries (`IP` or
    /// `IP:port`), instead of the host's own from `/etc/resolv.conf`.
    pub dns_servers: Vec<String>,
    /// Host folders shared into the VM at the same path (`PATH` or
    /// `PATH:ro`). Unset: the home directory and the temp directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shares: Option<Vec<String>>,
}

/// The folders shared when `shares` is unset: the user's home and the
/// system temp directory.
pub fn default_shares() -> Vec<String> {
    let mut v = Vec::new();
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        v.push(home.to_string_lossy().trim_end_matches('/').to_owned());
    }
    let tmp = std::env::temp_dir();
    let tmp = tmp.to_string_lossy().trim_end_matches('/').to_owned();
    if !tmp.is_empty() && !v.contains(&tmp) {
        v.push(tmp);
    }
    v.retain(|p| berth_proto::share::check_path(p).is_ok());
    v
}

/// Splits `PATH[:ro]`.
pub fn parse_share(s: &str) -> (&str, bool) {
    match s.strip_suffix(":ro") {
        Some(p) => (p, true),
        None => (s, false),
    }
}

/// A nameserver setting: `IP` (port 53) or `IP:port`, `[v6]:port`.
pub fn parse_dns_server(s: &str) -> Option<std::net::SocketAddr> {
    s.parse::<std::net::SocketAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(|ip| (ip, 53).into()))
}

impl Config {
    /// The configured nameservers (validated on load).
    /// The shared folders as the guest gets them (`share0`, `share1`, …),
    /// leaving out folders that do not exist (or are not directories) now.
    pub fn share_specs(&self) -> (Vec<berth_proto::share::ShareSpec>, Vec<String>) {
        let list = self.shares.clone().unwrap_or_else(default_shares);
        let mut specs = Vec::new();
        let mut missing = Vec::new();
        for s in &list {
            let (path, read_only) = parse_share(s);
            if !Path::new(path).is_dir() {
                missing.push(path.to_owned());
                continue;
            }
            specs.push(berth_proto::share::ShareSpec {
                tag: format!("share{}", specs.len()),
                path: path.to_owned(),
                read_only,
            });
        }
        (specs, missing)
    }

    pub fn dns_server_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.dns_servers
            .iter()
            .filter_map(|s| parse_dns_server(s))
            .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cpus: 2,
            memory_mib: 2048,
            disk_gib: 64,
            cmdline_extra: String::new(),
            driver: DriverChoice::Auto,
            switch_docker_context: true,
            log_max_mib: 8,
            dns_servers: Vec::new(),
            shares: None,
        }
    }
}

/// Whether a change applies now or at the next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    Now,
    NextStart,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the file atomically (temp file + fsync + rename).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        use std::io::Write;
        let err = |source| ConfigError::Write {
            path: path.display().to_string(),
            source,
        };
        let text = toml::to_string(self).expect("config serializes");
        let tmp = path.with_extension("toml.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.cpus == 0 || self.cpus as usize > host_cpus.max(1) * 4 || self.cpus > 64 {
            return Err(ConfigError::Invalid {
                key: "cpus",
                message: format!(
                    "{} is out of range 1..={}",
                    self.cpus,
                    (host_cpus * 4).min(64)
                ),
            });
        }
        let host_mib = host_memory_mib();
        if self.memory_mib < 512 || self.memory_mib > host_mib {
            return Err(ConfigError::Invalid {
                key: "memory_mib",
                message: format!(
                    "{} MiB is out of range 512..={host_mib} (this host's memory)",
                    self.memory_mib
                ),
            });
        }
        if !(4..=16384).contains(&self.disk_gib) {
            return Err(ConfigError::Invalid {
                key: "disk_gib",
                message: format!("{} GiB is out of range 4..=16384", self.disk_gib),
            });
        }
        if !(1..=1024).contains(&self.log_max_mib) {
            return Err(ConfigError::Invalid {
                key: "log_max_mib",
                message: format!("{} MiB is out of range 1..=1024", self.log_max_mib),
            });
        }
        if self.dns_servers.len() > 8 {
            return Err(ConfigError::Invalid {
                key: "dns_servers",
                message: "at most 8 servers".into(),
            });
        }
        if let Some(bad) = self
            .dns_servers
            .iter()
            .find(|s| parse_dns_server(s).is_none())
        {
            return Err(ConfigError::Invalid {
                key: "dns_servers",
                message: format!("{bad:?} is not an IP address or IP:port"),
            });
        }
        if let Some(shares) = &self.shares {
            let invalid = |message: String| ConfigError::Invalid {
                key: "shares",
                message,
            };
            if shares.len() > berth_proto::share::MAX_SHARES {
                return Err(invalid(format!(
                    "at most {} shared folders",
                    berth_proto::share::MAX_SHARES
                )));
            }
            let mut seen = std::collections::HashSet::new();
            for s in shares {
                let (path, _) = parse_share(s);
                berth_proto::share::check_path(path).map_err(|e| invalid(e.to_string()))?;
                if !seen.insert(path) {
                    return Err(invalid(format!("{path} is listed twice")));
                }
            }
        }
        if self.cmdline_extra.len() > 1024
            || self
                .cmdline_extra
                .chars()
                .any(|c| c.is_control() || !c.is_ascii())
        {
            return Err(ConfigError::Invalid {
                key: "cmdline_extra",
                message: "must be printable ASCII on one line, at most 1024 bytes".into(),
            });
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Result<String, ConfigError> {
        Ok(match key {
            "cpus" => self.cpus.to_string(),
            "memory_mib" => self.memory_mib.to_string(),
            "disk_gib" => self.disk_gib.to_string(),
            "cmdline_extra" => self.cmdline_extra.clone(),
            "driver" => self.driver.to_string(),
            "switch_docker_context" => self.switch_docker_context.to_string(),
            "log_max_mib" => self.log_max_mib.to_string(),
            "dns_servers" => self.dns_servers.join(","),
            "shares" => self.shares.clone().unwrap_or_else(default_shares).join(","),
            other => return Err(ConfigError::UnknownKey(other.to_owned())),
        })
    }

    /// Changes one setting, validating it. `current_disk_gib` is the size of
    /// the existing data disk, if any: disks grow but never shrink.
    pub fn set(
        &mut self,
        key: &str,
        value: &str,
        current_disk_gib: Option<u64>,
    ) -> Result<Applies, ConfigError> {
        fn num<T: std::str::FromStr>(key: &'static str, v: &str) -> Result<T, ConfigError> {
            v.trim().parse().map_err(|_| ConfigError::Invalid {
                key,
                message: format!("{v:?} is not a whole number"),
            })
        }
        let mut next = self.clone();
        let applies = match key {
            "cpus" => {
                next.cpus = num("cpus", value)?;
                Applies::NextStart
            }
            "memory_mib" => {
                next.memory_mib = num("memory_mib", value)?;
                Applies::NextStart
            }
            "disk_gib" => {
                next.disk_gib = num("disk_gib", value)?;
                if let Some(cur) = current_disk_gib {
                    if next.disk_gib < cur {
                        return Err(ConfigError::Invalid {
                            key: "disk_gib",
                            message: format!(
                                "the data disk is {cur} GiB and cannot shrink (nothing would be lost only if it were empty)"
                            ),
                        });
                    }
                }
                Applies::NextStart
            }
            "cmdline_extra" => {
                next.cmdline_extra = value.to_owned();
                Applies::NextStart
            }
            "log_max_mib" => {
                next.log_max_mib = num("log_max_mib", value)?;
                Applies::NextStart
            }
            "driver" => {
                next.driver = value.parse().map_err(|message| ConfigError::Invalid {
                    key: "driver",
                    message,
                })?;
                Applies::NextStart
            }
            "dns_servers" => {
                next.dns_servers = value
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                Applies::NextStart
            }
            "shares" => {
                next.shares = if value.trim() == "default" {
                    None
                } else {
                    let list: Vec<String> = value
                        .split(',')
                        .map(|s| s.trim().trim_end_matches('/').to_owned())
                        .filter(|s| !s.is_empty())
                        .collect();
                    if let Some(missing) = list
                        .iter()
                        .map(|s| parse_share(s).0)
                        .find(|p| !Path::new(p).is_dir())
                    {
                        return Err(ConfigError::Invalid {
                            key: "shares",
                            message: format!("{missing} is not a folder on this host"),
                        });
                    }
                    Some(list)
                };
                // The devices are attached when the VM boots.
                Applies::NextStart
            }
            "switch_docker_context" => {
                next.switch_docker_context =
                    value.trim().parse().map_err(|_| ConfigError::Invalid {
                        key: "switch_docker_context",
                        message: format!("{value:?} is not true or false"),
                    })?;
                Applies::Now
            }
            other => return Err(ConfigError::UnknownKey(other.to_owned())),
        };
        next.validate()?;
        *self = next;
        Ok(applies)
    }
}

/// Total memory of this host in MiB (a generous guess where it can't be read).
pub fn host_memory_mib() -> u64 {
    berth_hypervisor::host_memory_mib().unwrap_or(16 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip() {
        let d = std::env::temp_dir().join(format!("berth-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("config.toml");
        assert_eq!(Config::load(&p).unwrap(), Config::default());
        let mut c = Config::default();
        assert_eq!(c.set("cpus", "1", None).unwrap(), Applies::NextStart);
        assert_eq!(c.set("driver", "qemu", None).unwrap(), Applies::NextStart);
        c.set("dns_servers", "127.0.0.1:5300, ::1", None).unwrap();
        assert_eq!(c.get("dns_servers").unwrap(), "127.0.0.1:5300,::1");
        assert_eq!(
            c.dns_server_addrs(),
            vec![
                "127.0.0.1:5300".parse::<std::net::SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        c.save(&p).unwrap();
        assert_eq!(Config::load(&p).unwrap(), c);
        std::fs::write(&p, "cpus = 2\nmemory_mib = 1024\n").unwrap();
        assert_eq!(Config::load(&p).unwrap().memory_mib, 1024);
        std::fs::write(&p, "cpuz = 2\n").unwrap();
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_values_are_refused_and_leave_config_unchanged() {
        let mut c = Config::default();
        for (k, v) in [
            ("cpus", "0"),
            ("cpus", "many"),
            ("memory_mib", "100"),
            ("memory_mib", "99999999"),
            ("disk_gib", "1"),
            ("log_max_mib", "0"),
            ("log_max_mib", "2000"),
            ("cmdline_extra", "a\nb"),
            ("driver", "vbox"),
            ("switch_docker_context", "maybe"),
            ("dns_servers", "8.8.8.8,dns.example"),
        ] {
            assert!(c.set(k, v, None).is_err(), "{k}={v}");
        }
        assert!(matches!(
            c.set("colour", "x", None),
            Err(ConfigError::UnknownKey(_))
        ));
        assert!(c.set("disk_gib", "32", Some(64)).is_err());
        assert_eq!(c, Config::default());
    }

    #[test]
    fn shares_default_to_home_and_temp_and_are_validated() {
        let mut c = Config::default();
        let (specs, _) = c.share_specs();
        let tmp = std::env::temp_dir().display().to_string();
        let tmp = tmp.trim_end_matches('/');
        assert!(specs.iter().any(|s| s.path == tmp), "{specs:?}");
        assert_eq!(specs[0].tag, "share0");
        assert_eq!(
            c.set("shares", &format!("{tmp}:ro"), None).unwrap(),
            Applies::NextStart
        );
        let (specs, missing) = c.share_specs();
        assert_eq!(
            (specs.len(), specs[0].read_only, missing.len()),
            (1, true, 0)
        );
        assert_eq!(c.get("shares").unwrap(), format!("{tmp}:ro"));
        for bad in [
            "relative/dir".to_owned(),
            "/no/such/folder/here".to_owned(),
            format!("{tmp},{tmp}"),
            format!("{tmp}/../etc"),
        ] {
            let e = c.set("shares", &bad, None).unwrap_err().to_string();
            assert!(e.contains("shares"), "{bad}: {e}");
        }
        c.set("shares", "", None).unwrap();
        assert!(c.share_specs().0.is_empty());
        c.set("shares", "default", None).unwrap();
        assert_eq!(c.shares, None);
        // A folder that went away is reported, not shared.
        c.shares = Some(vec!["/no/such/folder/here".into()]);
        assert_eq!(c.share_specs().1, vec!["/no/such/folder/here".to_owned()]);
    }
}
