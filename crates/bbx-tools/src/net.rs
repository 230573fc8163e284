//! Which addresses a tool may reach.
//!
//! By default only public unicast addresses: loopback, private (RFC 1918 and IPv6
//! unique local), link-local (which holds the cloud metadata service at
//! 169.254.169.254), shared, multicast and unspecified addresses are refused, as are
//! IPv4 addresses wrapped in IPv6. An agent's `allow_networks` lets chosen ones through.

use bbx_core::quota::ToolSettings;
use bbx_core::{Error, ErrorCode, Result};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addresses one agent's tools may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    /// Every address: for what the operator configured, which agents cannot name.
    pub fn unrestricted() -> Self {
        Self {
            allow: vec![
                "0.0.0.0/0".parse().expect("a network"),
                "::/0".parse().expect("a network"),
            ],
        }
    }

    pub fn new(settings: &ToolSettings) -> Result<Self> {
        let mut allow = settings
            .allow_networks
            .iter()
            .map(|net| parse_network(net))
            .collect::<Result<Vec<_>>>()?;
        allow.sort();
        allow.dedup();
        Ok(Self { allow })
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_restricted(ip) || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// `Ok` if `ip` may be reached, else the error that says why not.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<()> {
        if self.permits(ip) {
            return Ok(());
        }
        Err(not_allowed(host, ip))
    }
}

pub(crate) fn not_allowed(host: &str, ip: IpAddr) -> Error {
    Error::new(
        ErrorCode::AddressNotAllowed,
        format!(
            "{host} resolves to {ip}, a private, loopback, link-local or metadata address; \
             the agent's tools.allow_networks must list it to allow it"
        ),
    )
    .with_details(serde_json::json!({ "host": host, "address": ip.to_string() }))
}

/// A CIDR ("10.0.0.0/8") or a single address ("127.0.0.1").
fn parse_network(text: &str) -> Result<IpNet> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            Error::invalid_field(
                "tools.allow_networks",
                format!("{text:?} is not a network (write it as a CIDR, e.g. 127.0.0.0/8)"),
            )
        })
}

/// Checks an agent's tool settings.
pub fn validate_settings(settings: &ToolSettings) -> Result<()> {
    AddressPolicy::new(settings)?;
    for (name, url) in &settings.mcp_servers {
        let valid =
            reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if name.is_empty() || !valid {
            return Err(Error::invalid_field(
                "tools.mcp_servers",
                format!("MCP server {name:?} needs an http:// or https:// URL, got {url:?}"),
            ));
        }
    }
    for name in &settings.env_allow {
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Error::invalid_field(
                "tools.env_allow",
                format!("{name:?} is not an environment variable name"),
            ));
        }
    }
    Ok(())
}

/// Whether an address is one a tool may not reach unless allowed.
pub fn is_restricted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => restricted_v4(v4),
        IpAddr::V6(v6) => restricted_v6(v6),
    }
}

fn restricted_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        // Shared address space (carrier-grade NAT), 100.64.0.0/10.
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments, 192.0.0.0/24.
        || ip.octets()[..3] == [192, 0, 0]
        // Reserved, 240.0.0.0/4.
        || a >= 240
}

fn restricted_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return restricted_v4(v4);
    }
    let segments = ip.segments();
    let octets = ip.octets();
    // Prefixes that carry an IPv4 address, which a translator on the path would
    // reach: NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and 6to4 (2002::/16).
    let embedded = if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || segments[..2] == [0x64, 0xff9b] {
        Some(Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]))
    } else if segments[0] == 0x2002 {
        Some(Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]))
    } else {
        None
    };
    if let Some(v4) = embedded {
        return restricted_v4(v4);
    }
    let first = segments[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // Unique local, fc00::/7 (which holds fd00:ec2::254, a metadata address).
        || (first & 0xfe00) == 0xfc00
        // Link-local, fe80::/10.
        || (first & 0xffc0) == 0xfe80
        // IPv4-compatible (deprecated), ::/96.
        || ip.segments()[..6] == [0; 6]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn private_loopback_link_local_and_metadata_addresses_are_restricted() {
        for restricted in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "224.0.0.1",
            "64:ff9b::a00:5",
            "64:ff9b::a9fe:a9fe",
            "2002:a00:1::1",
        ] {
            assert!(is_restricted(ip(restricted)), "{restricted}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(!is_restricted(ip(public)), "{public}");
        }
    }

    #[test]
    fn allowed_networks_open_exactly_themselves() {
        let policy = AddressPolicy::new(&ToolSettings {
            allow_networks: vec!["127.0.0.0/8".into(), "::1".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("::1")));
        assert!(!policy.permits(ip("10.0.0.1")));
        assert!(!policy.permits(ip("169.254.169.254")));
        assert_eq!(
            policy.check("localhost", ip("10.0.0.1")).unwrap_err().code,
            ErrorCode::AddressNotAllowed
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad_net = ToolSettings {
            allow_networks: vec!["localhost".into()],
            ..Default::default()
        };
        assert!(validate_settings(&bad_net).is_err());
        let bad_env = ToolSettings {
            env_allow: vec!["A=B".into()],
            ..Default::default()
        };
        assert!(validate_settings(&bad_env).is_err());
    }
}
