//! kube-proxy's configuration file (`xskgate run --config FILE`): a
//! `KubeProxyConfiguration` of `kubeproxy.config.k8s.io/v1alpha1`, YAML or
//! JSON, as kubeadm writes it into the `kube-proxy` ConfigMap.
//!
//! The fields whose meaning xskgate shares take effect ([`KubeProxyConfig`]'s
//! fields); every other field is named in [`KubeProxyConfig::unused`] (with
//! its value and why it does nothing here) when it asks for something, or in
//! [`KubeProxyConfig::unused_at_default`] when it holds its zero value
//! (`null`, `""`, `0`, `false`, `0s`: what kube-proxy reads as "the default").
//! A known field with a value of the wrong shape is an error naming it; a
//! file of another apiVersion or kind is an error.
//!
//! Precedence is decided by the caller (`xskgate run`): a flag given on the
//! command line overrides the file, with a log line. (kube-proxy ignores
//! most flags when `--config` is given, a known surprise; xskgate does not.)

use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// The default ports of the health and metrics servers, as kube-proxy's.
pub const HEALTHZ_PORT: u16 = 10256;
pub const METRICS_PORT: u16 = 10249;

/// A field of the file that xskgate does not use, and asks for something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unused {
    /// Its path, as kube-proxy's documentation names it (`ipvs.scheduler`).
    pub field: String,
    /// Its value, as compact JSON.
    pub value: String,
    pub why: &'static str,
}

/// What a `KubeProxyConfiguration` asks of xskgate. `None` and empty lists
/// are fields the file leaves at their defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeProxyConfig {
    /// `hostnameOverride` (`--hostname-override`, `--node-name`).
    pub hostname_override: Option<String>,
    /// `clusterCIDR`, split at commas (`--cluster-cidr`).
    pub cluster_cidr: Vec<String>,
    /// `healthzBindAddress` (`IP:PORT`, or an IP and port 10256).
    pub healthz_bind_address: Option<SocketAddr>,
    /// `metricsBindAddress` (`IP:PORT`, or an IP and port 10249).
    pub metrics_bind_address: Option<SocketAddr>,
    /// `clientConnection.kubeconfig` (`--kubeconfig`).
    pub kubeconfig: Option<PathBuf>,
    /// `conntrack.maxPerCore` and `conntrack.min` (`--conntrack-max-per-core`,
    /// `--conntrack-min`).
    pub conntrack_max_per_core: Option<u32>,
    pub conntrack_min: Option<u32>,
    /// `conntrack.tcpEstablishedTimeout`, `tcpCloseWaitTimeout`,
    /// `udpTimeout`, `udpStreamTimeout`, in seconds.
    pub conntrack_tcp_timeout_established: Option<u32>,
    pub conntrack_tcp_timeout_close_wait: Option<u32>,
    pub conntrack_udp_timeout: Option<u32>,
    pub conntrack_udp_timeout_stream: Option<u32>,
    /// `nodePortAddresses` (`--nodeport-addresses`).
    pub nodeport_addresses: Vec<String>,
    /// Fields xskgate does not use that are set, sorted by name.
    pub unused: Vec<Unused>,
    /// Fields xskgate does not use, at their zero values, sorted by name.
    pub unused_at_default: Vec<String>,
}

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not YAML or JSON: {0}")]
    Syntax(String),
    #[error("apiVersion {found:?}, kind {kind:?}: expected {API_VERSION}, {KIND}")]
    NotKubeProxy { found: String, kind: String },
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

/// A Go duration as kube-proxy's flags and file take it (`24h0m0s`, `90s`,
/// `1m30s`, `1500ms`), in whole seconds, at least one.
///
/// # Errors
/// A message naming what is wrong with `s`.
pub fn go_duration_secs(s: &str) -> Result<u32, String> {
    let mut rest = s.trim();
    let mut ms: u64 = 0;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let n: u64 = rest[..digits].parse().map_err(|_| format!("{s:?}: expected a number before each unit"))?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "h" => 3_600_000,
            "m" => 60_000,
            "s" => 1_000,
            "ms" => 1,
            u => return Err(format!("{s:?}: unit {u:?} is not one of h, m, s, ms")),
        };
        ms = n.checked_mul(scale).and_then(|v| v.checked_add(ms)).ok_or_else(|| format!("{s:?}: too long"))?;
        rest = &rest[unit..];
    }
    if !ms.is_multiple_of(1000) || ms == 0 {
        return Err(format!("{s:?}: conntrack timeouts are whole seconds, at least 1s"));
    }
    u32::try_from(ms / 1000).map_err(|_| format!("{s:?}: too long"))
}

/// A bind address as kube-proxy takes it: `IP:PORT`, or an IP alone and
/// `default_port`.
///
/// # Errors
/// A message naming the value.
pub fn bind_address(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, default_port)))
        .map_err(|_| format!("{s:?}: expected IP:PORT or an IP"))
}

/// kube-proxy's zero values: what its defaulting replaces.
fn at_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || is_zero_duration(s),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// `0`, `0s`, `0m0s`, `0h0m0s`: a zero (of a duration, or a count as a
/// string, as `logging.options.json.infoBufferSize: "0"`).
fn is_zero_duration(s: &str) -> bool {
    !s.is_empty() && s.trim_start_matches(|c: char| c == '0' || "hms".contains(c)).is_empty() && s.starts_with('0')
}

/// Why a field xskgate does not use does nothing here.
fn why_unused(field: &str) -> &'static str {
    let top = field.split('.').next().unwrap_or(field);
    match top {
        "mode" => "xskgate is the data path itself (AF_XDP); it has no proxy modes",
        "iptables" | "ipvs" | "nftables" | "winkernel" => "a setting of a kube-proxy mode xskgate does not have",
        "bindAddress" => "xskgate's node addresses are those of --interfaces",
        "detectLocalMode" | "detectLocal" => "xskgate tells traffic from pods by --cluster-cidr",
        "clientConnection" => "xskgate's watchers are not rate-limited and speak JSON",
        "configSyncPeriod" => "xskgate follows watches and has no periodic resync",
        "logging" => "xskgate logs by RUST_LOG (for example RUST_LOG=debug)",
        "conntrack" => "xskgate's conntrack has no such setting",
        _ => "xskgate has no such setting",
    }
}

/// Parses a `KubeProxyConfiguration`.
///
/// # Errors
/// [`ConfigError`]: not YAML or JSON, not a KubeProxyConfiguration, or a
/// known field of the wrong shape.
pub fn parse(text: &str) -> Result<KubeProxyConfig, ConfigError> {
    let doc: Value = serde_norway::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
    let (api, kind) = (doc["apiVersion"].as_str().unwrap_or(""), doc["kind"].as_str().unwrap_or(""));
    if api != API_VERSION || kind != KIND {
        return Err(ConfigError::NotKubeProxy { found: api.to_string(), kind: kind.to_string() });
    }
    let mut leaves = Vec::new();
    flatten("", &doc, &mut leaves);
    let mut cfg = KubeProxyConfig::default();
    for (field, value) in leaves {
        let bad = |message: String| ConfigError::Field { field: field.clone(), message };
        let text = || value.as_str().map(str::trim).filter(|s| !s.is_empty());
        let duration = || -> Result<Option<u32>, ConfigError> {
            match &value {
                Value::Null => Ok(None),
                Value::String(s) if is_zero_duration(s) => Ok(None),
                Value::String(s) => go_duration_secs(s).map(Some).map_err(bad),
                other => Err(bad(format!("{other}: expected a duration such as 24h0m0s"))),
            }
        };
        let count = || -> Result<Option<u32>, ConfigError> {
            match &value {
                Value::Null => Ok(None),
                Value::Number(n) => n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(|n| (n > 0).then_some(n))
                    .ok_or_else(|| bad(format!("{n}: expected a count"))),
                other => Err(bad(format!("{other}: expected a count"))),
            }
        };
        match field.as_str() {
            "apiVersion" | "kind" => {}
            "hostnameOverride" => cfg.hostname_override = text().map(str::to_string),
            "clusterCIDR" => {
                cfg.cluster_cidr = text().into_iter().flat_map(|s| s.split(',')).map(|c| c.trim().to_string()).collect()
            }
            "healthzBindAddress" => {
                cfg.healthz_bind_address = text().map(|s| bind_address(s, HEALTHZ_PORT)).transpose().map_err(bad)?
            }
            "metricsBindAddress" => {
                cfg.metrics_bind_address = text().map(|s| bind_address(s, METRICS_PORT)).transpose().map_err(bad)?
            }
            "clientConnection.kubeconfig" => cfg.kubeconfig = text().map(PathBuf::from),
            "conntrack.maxPerCore" => cfg.conntrack_max_per_core = count()?,
            "conntrack.min" => cfg.conntrack_min = count()?,
            "conntrack.tcpEstablishedTimeout" => cfg.conntrack_tcp_timeout_established = duration()?,
            "conntrack.tcpCloseWaitTimeout" => cfg.conntrack_tcp_timeout_close_wait = duration()?,
            "conntrack.udpTimeout" => cfg.conntrack_udp_timeout = duration()?,
            "conntrack.udpStreamTimeout" => cfg.conntrack_udp_timeout_stream = duration()?,
            "nodePortAddresses" => {
                cfg.nodeport_addresses = match &value {
                    Value::Null => Vec::new(),
                    Value::Array(a) => a
                        .iter()
                        .map(|c| c.as_str().map(str::to_string).ok_or_else(|| bad(format!("{c}: expected a CIDR"))))
                        .collect::<Result<_, _>>()?,
                    other => return Err(bad(format!("{other}: expected a list of CIDRs"))),
                }
            }
            _ if at_default(&value) => cfg.unused_at_default.push(field),
            _ => cfg.unused.push(Unused { value: value.to_string(), why: why_unused(&field), field }),
        }
    }
    Ok(cfg)
}

/// The leaves of `v` with their dotted paths: objects are walked, lists and
/// scalars are leaves, and so is an empty object.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, v) in o {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&path, v, out);
            }
        }
        _ => out.push((prefix.to_string(), v.clone())),
    }
}

/// The conntrack capacity kube-proxy would size for `per_core` and `min`
/// on `cpus` CPUs: `max(per_core × cpus, min)`.
pub fn conntrack_capacity(per_core: u32, min: u32, cpus: usize) -> usize {
    (per_core as usize).saturating_mul(cpus).max(min as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_as_kube_proxy_writes_them() {
        assert_eq!(go_duration_secs("24h0m0s"), Ok(86_400));
        assert_eq!(go_duration_secs("1h0m0s"), Ok(3_600));
        assert_eq!(go_duration_secs("1m30s"), Ok(90));
        assert_eq!(go_duration_secs("2000ms"), Ok(2));
        assert!(go_duration_secs("1500ms").unwrap_err().contains("whole seconds"));
        assert!(go_duration_secs("0s").unwrap_err().contains("at least 1s"));
        assert!(go_duration_secs("5d").unwrap_err().contains("unit \"d\""));
        assert!(go_duration_secs("s").unwrap_err().contains("expected a number"));
        assert!(go_duration_secs("").is_err());
        assert!(go_duration_secs("99999999999h").unwrap_err().contains("too long"));
        assert!(is_zero_duration("0s") && is_zero_duration("0h0m0s") && !is_zero_duration("10s"));
    }

    #[test]
    fn bind_addresses_take_an_ip_alone() {
        assert_eq!(bind_address("0.0.0.0:10256", 1), Ok("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(bind_address("198.18.0.1", HEALTHZ_PORT), Ok("198.18.0.1:10256".parse().unwrap()));
        assert_eq!(bind_address("::1", METRICS_PORT), Ok("[::1]:10249".parse().unwrap()));
        assert!(bind_address("localhost", 1).is_err());
    }

    #[test]
    fn another_kind_or_a_bad_field_is_an_error_naming_it() {
        let other = parse("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n").unwrap_err();
        assert!(other.to_string().contains("KubeletConfiguration"), "{other}");
        let bad =
            parse(&format!("apiVersion: {API_VERSION}\nkind: {KIND}\nconntrack:\n  udpTimeout: 5d\n")).unwrap_err();
        assert!(bad.to_string().starts_with("conntrack.udpTimeout: "), "{bad}");
        let bad = parse(&format!("apiVersion: {API_VERSION}\nkind: {KIND}\nhealthzBindAddress: here\n")).unwrap_err();
        assert!(bad.to_string().starts_with("healthzBindAddress: "), "{bad}");
        assert!(matches!(parse("{"), Err(ConfigError::Syntax(_))));
    }

    #[test]
    fn json_works_as_well_and_unused_fields_are_named_with_their_values() {
        let cfg = parse(&format!(
            r#"{{"apiVersion": "{API_VERSION}", "kind": "{KIND}", "mode": "ipvs", "ipvs": {{"scheduler": "rr", "strictARP": false}},
                "conntrack": {{"maxPerCore": 65536, "min": 0}}, "featureGates": {{}}}}"#
        ))
        .unwrap();
        assert_eq!(cfg.conntrack_max_per_core, Some(65_536));
        assert_eq!(cfg.conntrack_min, None, "0 is the default");
        let named: Vec<(&str, &str)> = cfg.unused.iter().map(|u| (u.field.as_str(), u.value.as_str())).collect();
        assert_eq!(named, [("ipvs.scheduler", "\"rr\""), ("mode", "\"ipvs\"")]);
        assert_eq!(cfg.unused_at_default, ["featureGates", "ipvs.strictARP"]);
    }

    #[test]
    fn conntrack_is_sized_as_kube_proxy_sizes_it() {
        assert_eq!(conntrack_capacity(32_768, 131_072, 2), 131_072);
        assert_eq!(conntrack_capacity(32_768, 131_072, 16), 524_288);
    }
}
