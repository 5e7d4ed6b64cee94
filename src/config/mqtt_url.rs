//! The broker's address, `[mqtt] url`: the one parser of MQTT urls in berth.
//! Config validation turns the url into an [`MqttEndpoint`] (scheme, host,
//! port), which the reporter connects to and anything else that needs a
//! broker reuses. Pure: it touches neither the network nor the file system.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The port of `mqtt://` when the url names none.
pub const MQTT_PORT: u16 = 1883;
/// The port of `mqtts://` when the url names none.
pub const MQTTS_PORT: u16 = 8883;

/// Where the broker is and how to speak to it: `mqtt://host[:port]` or
/// `mqtts://host[:port]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    /// `mqtts://`: TLS to the broker.
    pub tls: bool,
    pub host: BrokerHost,
    /// From the url, else 1883 (`mqtt://`) or 8883 (`mqtts://`).
    pub port: u16,
}

/// The host part of the url.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerHost {
    /// A DNS name, resolved at each connection.
    Name(String),
    /// An address: IPv4 as written, IPv6 from between the brackets.
    Ip(IpAddr),
}

/// A url that is not `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid mqtt url \"{url}\": {problem}")]
pub struct MqttUrlError {
    /// The url as given, with any `user:password@` masked.
    pub url: String,
    pub problem: MqttUrlProblem,
}

/// What is wrong with a url.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MqttUrlProblem {
    #[error("use mqtt://host[:port], or mqtts://host[:port] for tls")]
    Scheme,
    #[error("put the user in username and the password in password_file, not in the url")]
    Credentials,
    #[error("a path or query is not allowed")]
    Path,
    #[error("missing ']' after the ipv6 address")]
    UnclosedBracket,
    #[error("only ':' and a port may follow ']'")]
    AfterBracket,
    #[error("not an ipv6 address between '[' and ']'")]
    Ipv6,
    #[error("an ipv6 address goes in brackets, as in mqtt://[::1]:1883")]
    BareIpv6,
    #[error("missing or invalid host")]
    Host,
    #[error("the port must be a number from 1 to 65535")]
    Port,
}

impl MqttEndpoint {
    /// The host as the MQTT client takes it: a name, or an address without
    /// brackets. rumqttc writes `host:port` for the TCP connect, which the
    /// resolver splits at the last ':' (so `::1:1883` works), and hands the
    /// host alone to TLS as the server name, where only a bare address is
    /// one.
    pub fn connect_host(&self) -> String {
        match &self.host {
            BrokerHost::Name(name) => name.clone(),
            BrokerHost::Ip(ip) => ip.to_string(),
        }
    }
}

impl Default for MqttEndpoint {
    /// `mqtt://127.0.0.1:1883`, SPEC 3's default.
    fn default() -> MqttEndpoint {
        MqttEndpoint {
            tls: false,
            host: BrokerHost::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            port: MQTT_PORT,
        }
    }
}

impl fmt::Display for BrokerHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerHost::Name(name) => f.write_str(name),
            BrokerHost::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            BrokerHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

impl fmt::Display for MqttEndpoint {
    /// The url again, normalised: `mqtts://[::1]:8883`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl FromStr for MqttEndpoint {
    type Err = MqttUrlError;

    /// Reads `mqtt://host[:port]` or `mqtts://host[:port]`; one trailing `/`
    /// is allowed, a path, query or `user@` is not.
    fn from_str(url: &str) -> Result<MqttEndpoint, MqttUrlError> {
        let bad = |problem| MqttUrlError {
            url: without_userinfo(url),
            problem,
        };
        let (tls, default_port, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, MQTTS_PORT, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, MQTT_PORT, rest)
        } else {
            return Err(bad(MqttUrlProblem::Scheme));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(bad(MqttUrlProblem::Credentials));
        }
        if authority.contains(['/', '?', '#']) {
            return Err(bad(MqttUrlProblem::Path));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (inside, after) = bracketed
                .split_once(']')
                .ok_or(bad(MqttUrlProblem::UnclosedBracket))?;
            let ip: Ipv6Addr = inside.parse().map_err(|_| bad(MqttUrlProblem::Ipv6))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or(bad(MqttUrlProblem::AfterBracket))?,
                ),
            };
            (BrokerHost::Ip(IpAddr::V6(ip)), port)
        } else {
            if authority.matches(':').count() > 1 {
                return Err(bad(MqttUrlProblem::BareIpv6));
            }
            let (host, port) = match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            (parse_host(host).ok_or(bad(MqttUrlProblem::Host))?, port)
        };
        let port = match port {
            None => default_port,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(bad(MqttUrlProblem::Port)),
            },
        };
        Ok(MqttEndpoint { tls, host, port })
    }
}

/// An IPv4 address, or a DNS name (letters, digits, '-', '_', dots between
/// labels). Digits and dots alone that are no IPv4 address are refused
/// rather than looked up as a name.
fn parse_host(host: &str) -> Option<BrokerHost> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Some(BrokerHost::Ip(IpAddr::V4(ip)));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let labels_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        });
    let numeric = name.chars().all(|c| c.is_ascii_digit() || c == '.');
    (labels_ok && !numeric).then(|| BrokerHost::Name(host.to_owned()))
}

/// The url as it may be shown: a password put in it stays out of errors
/// and logs.
fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(tls: bool, host: BrokerHost, port: u16) -> MqttEndpoint {
        MqttEndpoint { tls, host, port }
    }

    fn name(host: &str) -> BrokerHost {
        BrokerHost::Name(host.to_owned())
    }

    fn ip(host: &str) -> BrokerHost {
        BrokerHost::Ip(host.parse().unwrap())
    }

    fn problem(url: &str) -> MqttUrlProblem {
        match url.parse::<MqttEndpoint>() {
            Ok(endpoint) => panic!("{url} was accepted as {endpoint:?}"),
            Err(error) => error.problem,
        }
    }

    #[test]
    fn an_ipv4_address_with_its_port() {
        assert_eq!(
            "mqtt://10.0.0.1:1884".parse(),
            Ok(endpoint(false, ip("10.0.0.1"), 1884))
        );
    }

    #[test]
    fn a_hostname_with_the_default_port() {
        assert_eq!(
            "mqtt://broker.example.com".parse(),
            Ok(endpoint(false, name("broker.example.com"), 1883))
        );
        assert_eq!(
            "mqtt://broker_1:1883/".parse(),
            Ok(endpoint(false, name("broker_1"), 1883))
        );
    }

    #[test]
    fn mqtts_defaults_to_8883() {
        assert_eq!(
            "mqtts://broker.example.com".parse(),
            Ok(endpoint(true, name("broker.example.com"), 8883))
        );
        assert_eq!(
            "mqtts://broker.example.com:443/".parse(),
            Ok(endpoint(true, name("broker.example.com"), 443))
        );
    }

    #[test]
    fn an_ipv6_address_in_brackets() {
        assert_eq!(
            "mqtt://[::1]:1883".parse(),
            Ok(endpoint(false, ip("::1"), 1883))
        );
        assert_eq!("mqtt://[::1]".parse(), Ok(endpoint(false, ip("::1"), 1883)));
        assert_eq!(
            "mqtts://[fe80::1]".parse(),
            Ok(endpoint(true, ip("fe80::1"), 8883))
        );
    }

    #[test]
    fn the_client_gets_the_host_without_brackets() {
        let v6: MqttEndpoint = "mqtts://[2001:db8::7]:8884".parse().unwrap();
        assert_eq!(v6.connect_host(), "2001:db8::7");
        let v4: MqttEndpoint = "mqtt://127.0.0.1".parse().unwrap();
        assert_eq!(v4.connect_host(), "127.0.0.1");
        let dns: MqttEndpoint = "mqtt://broker".parse().unwrap();
        assert_eq!(dns.connect_host(), "broker");
    }

    #[test]
    fn display_gives_the_url_back_with_its_port() {
        for (url, shown) in [
            ("mqtt://[::1]", "mqtt://[::1]:1883"),
            ("mqtts://broker/", "mqtts://broker:8883"),
            ("mqtt://10.0.0.1:1884", "mqtt://10.0.0.1:1884"),
        ] {
            let endpoint: MqttEndpoint = url.parse().unwrap();
            assert_eq!(endpoint.to_string(), shown);
            assert_eq!(shown.parse(), Ok(endpoint), "{shown} reads back");
        }
    }

    #[test]
    fn the_default_is_the_local_broker() {
        assert_eq!(
            MqttEndpoint::default(),
            "mqtt://127.0.0.1:1883".parse().unwrap()
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        use MqttUrlProblem::*;
        let rows = [
            ("127.0.0.1:1883", Scheme),
            ("http://broker:1883", Scheme),
            ("tcp://broker", Scheme),
            ("MQTT://broker", Scheme),
            ("mqtt://robot:secret@broker", Credentials),
            ("mqtt://broker/path", Path),
            ("mqtt://broker?client_id=x", Path),
            ("mqtt://[::1", UnclosedBracket),
            ("mqtt://[::1]x", AfterBracket),
            ("mqtt://[::1]1883", AfterBracket),
            ("mqtt://[broker]", Ipv6),
            ("mqtt://[10.0.0.1]", Ipv6),
            ("mqtt://[]", Ipv6),
            ("mqtt://::1", BareIpv6),
            ("mqtt://fe80::1:1883", BareIpv6),
            ("mqtt://", Host),
            ("mqtt://:1883", Host),
            ("mqtt://bro ker", Host),
            ("mqtt://broker..example", Host),
            ("mqtt://.broker", Host),
            ("mqtt://10.0.0.300", Host),
            ("mqtt://broker:", Port),
            ("mqtt://broker:x", Port),
            ("mqtt://broker:0", Port),
            ("mqtt://broker:99999", Port),
            ("mqtt://[::1]:", Port),
        ];
        for (url, want) in rows {
            assert_eq!(problem(url), want, "{url}");
        }
    }

    #[test]
    fn a_password_in_the_url_stays_out_of_the_error() {
        let error = "mqtt://robot:hunter2@broker:1883"
            .parse::<MqttEndpoint>()
            .unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        assert!(!format!("{error:?}").contains("hunter2"), "{error:?}");
        assert_eq!(
            error.to_string(),
            "invalid mqtt url \"mqtt://***@broker:1883\": put the user in username and \
             the password in password_file, not in the url"
        );
    }
}
